"""The decoder: one thread that owns the model and decodes concurrent requests together.

Requests become :class:`Row` s (one prompt each) in a bounded queue. The decoder thread takes the
oldest row, waits a few milliseconds for more (``batch_wait``), and decodes up to ``max_batch`` rows
in ONE batch through the fast engine of :mod:`qadapter.generation`: one forward per token for the
base branch and the adapter branch of every row (dynamic batching; rows that arrive while a batch
runs wait for the next one). A batch holds the rows of one adapter plus any base-model rows, since
a base row needs no adapter; every row keeps its own settings: its strength (α0, α̃), greedy or
sampled, temperature, top-p, top-k, seed, stop strings and token budget.

Exactness: each row's logits are composed from its own two branches with its own α's by the same
function ``QAdapter.generate`` uses (:func:`qadapter.objective.customized_logits`); greedy rows take
the argmax of their own row, sampled rows draw from their own ``torch.Generator`` (seeded per
request), through transformers' warpers in transformers' order. In a decoder no operation mixes
batch rows and left padding is masked with position ids that ignore it, so a row decodes what it
would decode alone, whatever else is in the batch: the tokens of a greedy request equal
``QAdapter.generate`` for that prompt alone (tests check both; in floating point a matrix product
over more rows may round differently in the last bit, which could only matter at an exact tie).

A row whose client went away is marked cancelled: the decoder stops it at the next step (it is fed
padding like a finished row) and the batch ends as soon as every row is finished or cancelled.

Continuous batching (``Scheduler(continuous=True)``, the default): between two tokens of a running
batch the decoder takes in waiting rows that its engine can serve (the same adapter, or base rows
where the batch runs both branches; only one-branch rows into a one-branch batch), oldest first,
up to ``max_batch`` live rows. The newcomers are prefilled by themselves; then the live rows and
the newcomers continue as ONE batch: a fresh fast engine adopts both KV caches, each left-padded
under a 0 mask to the longer one (:meth:`qadapter.generation.FastEngine.adopt`), and finished
rows leave. Left padding under a 0 mask changes no row's attention or positions, so the exactness
above holds for rows that join (tests/test_server_batching.py checks tokens against decoding
alone). A request therefore waits at most one token of the running batch plus its own prefill,
not the whole batch. Stacks and the reference engine (layers the fast engine cannot split) keep
dynamic batching.

The decode-step loop itself is :func:`qadapter.generation.decode`, the one ``QAdapter.generate``
runs: this module says which engine a batch runs (:class:`_Plan`), how each row's logits are
composed and who may join, and turns a request row's tokens into streamed text.

Why one module of ~430 lines: the decoder's loop, the row state it keeps and the scheduler that
feeds it rows between two tokens are one protocol (who may join, when, and who is told of an
error); split, the admission rules would live apart from the loop that relies on them.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import generation as G
from ..backbone import eos_token_ids, pad_token_id
from ..objective import adapter_only_logits, customized_logits
from ..stack import stack_engine, stack_logits

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"


class QueueFull(Exception):
    """The queue holds ``max_queue`` rows already (answer 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(Exception):
    """The decoder is not running (shutting down, or it failed): answer 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Row:
    """One prompt to decode, with its own settings, and where its tokens go.

    ``alphas`` is (α0, α̃) of the customized policy, or None for the base model π1 (then ``adapter``
    is None) and for a stack (then ``strengths`` holds its per-adapter strengths). ``temperature == 0`` means greedy. ``emit(event)`` is called from the decoder thread
    with ``("delta", text)`` as text becomes final and once with ``("done", finish_reason, n_tokens)``
    (or ``("error", message)``).
    """

    prompt_ids: list[int]
    max_new_tokens: int
    emit: Callable[[tuple], None]
    adapter: str | None = None  # public adapter name; None: the base model
    alphas: tuple[float, float] | None = None
    strengths: tuple[float, ...] | None = None  # a stack's per-adapter strengths (then alphas is None)
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    # filled while decoding
    new_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    finish_reason: str | None = None

    def cancel(self):
        self.cancelled.set()


class _Text:
    """Incremental detokenization of one row with OpenAI's stop-string semantics (the stop string
    ends the answer and is not part of it; text that could be the start of one is held back)."""

    def __init__(self, tokenizer, lock, stop: tuple[str, ...]):
        self.tokenizer, self.lock, self.stop = tokenizer, lock, stop

    def full(self, ids) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, row: Row, final: bool) -> tuple[str, bool]:
        """(newly final text, whether a stop string was completed)."""
        text = self.full(row.new_ids)
        hit = False
        if self.stop:
            cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if cuts:
                text, hit, final = text[:min(cuts)], True, True
        if not final:
            keep = len(text)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                keep = len(text.rstrip("\ufffd"))
            hold = 0  # the longest suffix that may still grow into a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, keep), hold, -1):
                    if text[:keep].endswith(s[:k]):
                        hold = k
                        break
            text = text[:keep - hold]
        if not text.startswith(row.emitted):  # the tokenizer rewrote earlier text: send only what extends it
            return "", hit
        delta = text[len(row.emitted):]
        row.emitted = text
        return delta, hit


class BatchDecoder:
    """Decodes a list of rows of (at most) one adapter in one batch, each with its own settings."""

    def __init__(self, served, stats: dict | None = None, max_rows: int = 16):
        self.served = served
        self.model = served.model
        self.tokenizer = served.tokenizer
        self.eos = eos_token_ids(self.model, self.tokenizer)
        self.pad_id = pad_token_id(self.tokenizer, self.model, self.eos)
        self.device = next(self.model.parameters()).device
        self.stats = stats if stats is not None else collections.Counter()
        self.max_rows = max_rows  # rows that joining requests may fill a running batch up to

    def _plan(self, rows: list[Row]) -> "_Plan":
        """What a batch of ``rows`` runs: its adapter (or stack), and whether the adapter branch alone
        serves every row (every row customized at α0 = q_scale, the tied default at strength 1, or a
        full Q̂ at α0 = 0: the base branch changes nothing the loop sees; a stack: every row at all
        strengths 1 runs z_k, the network with every adapter, alone)."""
        adapters = {r.adapter for r in rows if r.adapter is not None}
        if len(adapters) > 1:
            raise ValueError(f"one batch decodes one adapter, got {sorted(adapters)}")
        adapter = next(iter(adapters), None)
        served = self.served.adapters[adapter] if adapter else None
        plan = _Plan(adapter, None if served is None else served.settings, None if served is None else served.stack)
        keys = {plan.key(r) for r in rows}
        if plan.stack is not None:
            plan.adapter_only = None not in keys and all(all(x == 1.0 for x in key) for key in keys)
        else:
            plan.adapter_only = adapter is not None and None not in keys and all(plan.one_branch(k) for k in keys)
        return plan

    def _new_engine(self, plan: "_Plan"):
        """``new_engine(rows)`` for :func:`qadapter.generation.decode`: an engine that composes every
        row with its own settings (:func:`qadapter.generation.row_composer`)."""
        def new_engine(rows):
            compose = G.row_composer([plan.key(r.row) for r in rows], plan.compose_one)
            if plan.stack is not None:
                strengths = [1.0 if plan.adapter_only else 0.5] * len(plan.stack)  # they choose the branches
                return stack_engine(plan.stack, "customized", strengths, len(rows), compose=compose)
            if plan.adapter is None:
                return G.branches_engine(self.model, ("base",), len(rows), compose)
            self.model.set_adapter(self.served.adapters[plan.adapter].peft_name)
            branches = ("adapter",) if plan.adapter_only else ("base", "adapter")
            return G.branches_engine(self.model, branches, len(rows), compose)
        return new_engine

    def _decoding(self, r: Row) -> "_Decoding":
        """A row's decoding state: its text and its sampler (seeded per request)."""
        sampler = G.GREEDY
        if r.temperature > 0:
            sampler = G.Sampler.build(do_sample=True, prompt_len=len(r.prompt_ids), device=self.device, eos=self.eos,
                                      temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=r.seed)
        return _Decoding(r, sampler, _Text(self.tokenizer, self.served.tokenizer_lock, r.stop), self.stats)

    def decode(self, rows: list[Row], admit: Callable[[Callable[[Row], bool], int], list[Row]] | None = None) -> None:
        """Decode ``rows`` in one batch until every row is finished, through the one decode-step loop
        (:func:`qadapter.generation.decode`); ``admit(fits, n)`` (continuous batching) is asked between
        two tokens for up to ``n`` more rows that ``fits`` accepts: they are prefilled by themselves and
        join the running batch, and finished rows leave it then."""
        plan = self._plan(rows)
        self.stats["adapter_only_batches"] += int(plan.adapter_only)
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
        everyone = list(rows)  # every row this call decodes, newcomers included: all are told of an error

        def joining(n_live: int):
            if admit is None or plan.stack is not None or self.max_rows <= n_live:
                return []
            taken = admit(plan.fits, self.max_rows - n_live)
            everyone.extend(taken)
            self.stats["rows"] += len(taken)
            self.stats["rows_joined_running_batch"] += len(taken)
            self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], n_live + len(taken))
            return [self._decoding(r) for r in taken]

        was_training = self.model.training
        self.model.eval()
        try:
            G.decode(self._new_engine(plan), [self._decoding(r) for r in rows], eos=self.eos, pad_id=self.pad_id,
                     device=self.device, admit=joining)
        except BaseException as exc:
            for r in everyone:
                if r.finish_reason is None:
                    r.finish_reason = FINISH_ERROR
                    r.emit(("error", f"decoding failed: {type(exc).__name__}: {exc}"))
            raise
        finally:
            if was_training:
                self.model.train()


@dataclass
class _Plan:
    """One batch's adapter and the rules that follow from it: each row's settings key, how a key's
    logits are composed, and which waiting rows may join."""

    adapter: str | None
    settings: object  # the adapter's QAdapterSettings (a stack: its last adapter's); None: base only
    stack: object  # the served QAdapterStack, or None
    adapter_only: bool = False

    def key(self, r: Row):
        """A row's settings: None = the base model, else (α0, α̃) (a stack: its strengths)."""
        return r.strengths if self.stack is not None and r.adapter is not None else r.alphas

    def one_branch(self, alphas) -> bool:
        """Whether the adapter branch alone decodes a customized row at these α's."""
        return G.one_branch("customized", alphas[0], self.settings.parameterization, self.settings.q_scale)

    def compose_one(self, key, *branches):
        """The logits of rows with settings ``key`` from their raw branches."""
        if self.stack is not None:  # branches z_0..z_k, or z_k alone
            return branches[0] if key is None or self.adapter_only else stack_logits(branches, key)
        q, base = branches
        if key is None:
            return base
        if base is None:
            return adapter_only_logits(q, self.settings.parameterization, self.settings.q_scale, key[1])
        return customized_logits(q, base, parameterization=self.settings.parameterization,
                                 q_scale=self.settings.q_scale, alpha_0=key[0], alpha_tilde=key[1])

    def fits(self, r: Row) -> bool:
        """Whether a waiting row can join this batch: the same engine serves it."""
        if r.cancelled.is_set() or self.stack is not None:
            return False
        if self.adapter is None or r.adapter is None:
            return r.adapter is None and (self.adapter is None or not self.adapter_only)
        return r.adapter == self.adapter and (not self.adapter_only or self.one_branch(r.alphas))


class _Decoding(G.DecodeRow):
    """A request row in the decode-step loop: its text is streamed as it becomes final, it ends at
    end-of-turn, a stop string or its budget, and stops when its client went away."""

    def __init__(self, row: Row, sampler, text: _Text, stats):
        super().__init__(row.prompt_ids, row.max_new_tokens, None, sampler)
        self.row, self.text, self.stats = row, text, stats
        self.new_ids = row.new_ids  # the row's own list: what it decoded so far

    def cancelled(self) -> bool:
        if self.row.finish_reason is None and self.row.cancelled.is_set():
            self.row.finish_reason = FINISH_CANCELLED
            self.stats["rows_cancelled"] += 1
            return True
        return False

    def accept(self, token: int, is_eos: bool) -> bool:
        r = self.row
        r.new_ids.append(token)
        self.stats["tokens"] += 1
        out_of_budget = len(r.new_ids) >= r.max_new_tokens
        delta, hit = self.text.update(r, final=is_eos or out_of_budget)
        if delta:
            r.emit(("delta", delta))
        if is_eos or hit or out_of_budget:
            r.finish_reason = FINISH_STOP if (is_eos or hit) else FINISH_LENGTH
            r.emit(("done", r.finish_reason, len(r.new_ids)))
            return True
        return False


class Scheduler:
    """A bounded queue of rows and the decoder thread that batches them."""

    def __init__(self, served, *, max_batch: int = 16, max_queue: int = 64, batch_wait: float = 0.01,
                 continuous: bool = True):
        if max_batch < 1 or max_queue < 1 or not batch_wait >= 0:
            raise ValueError("max_batch and max_queue must be >= 1 and batch_wait >= 0")
        self.served, self.max_batch, self.max_queue, self.batch_wait = served, max_batch, max_queue, batch_wait
        self.continuous = continuous
        self.stats = collections.Counter()
        self.decoder = BatchDecoder(served, self.stats, max_rows=max_batch)
        self.pending: collections.deque[Row] = collections.deque()
        self.running = 0
        self.cv = threading.Condition()
        self.closed = False
        self.failure: str | None = None
        self.last_batch_seconds = 1.0
        self.free_since = 0.0
        self.current: list[Row] = []
        self.thread = threading.Thread(target=self._loop, name="qadapter-decoder", daemon=True)

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self.cv:
            self.closed = True
            for r in [*self.pending, *self.current]:  # the running batch stops at its next token
                r.cancel()
            self.cv.notify_all()
        if self.thread.ident is not None and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def retry_after(self) -> int:
        return max(1, math.ceil(self.last_batch_seconds))

    def submit(self, rows: list[Row]) -> None:
        """Queue the rows of one request (all or none)."""
        with self.cv:
            if self.closed or self.failure or not self.thread.is_alive():
                raise Unavailable("the server is not accepting requests: "
                                  + (self.failure or "it is shutting down"), self.retry_after())
            queued = sum(1 for r in self.pending if not r.cancelled.is_set())
            if queued + len(rows) > self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"the server is busy: {queued} prompts are waiting (at most {self.max_queue}); "
                                "retry later", self.retry_after())
            self.pending.extend(rows)
            self.cv.notify_all()

    def snapshot(self) -> dict:
        with self.cv:
            return {"queued": sum(1 for r in self.pending if not r.cancelled.is_set()), "running": self.running,
                    **{k: int(v) for k, v in self.stats.items()}}

    def _take(self) -> list[Row] | None:
        """Wait for rows and take the next batch (None: closed)."""
        with self.cv:
            while True:
                while self.pending and self.pending[0].cancelled.is_set():
                    self.pending.popleft()
                if self.closed:
                    return None
                if self.pending:
                    break
                self.cv.wait()
            # wait for company from when the first row arrived or the decoder became free, whichever
            # is later: clients whose answers just ended send their next request a moment later
            deadline = max(self.pending[0].arrived, self.free_since) + self.batch_wait
            while len(self.pending) < self.max_batch and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cv.wait(left)
            if self.closed:
                return None
            live = [r for r in self.pending if not r.cancelled.is_set()]
            adapter = next((r.adapter for r in live if r.adapter is not None), None)
            batch = [r for r in live if r.adapter in (None, adapter)][:self.max_batch]
            taken = set(map(id, batch))
            self.pending = collections.deque(r for r in live if id(r) not in taken)
            self.running = len(batch)
            self.current = batch
            return batch

    def _admit(self, fits: Callable[[Row], bool], n: int) -> list[Row]:
        """Up to ``n`` waiting rows for the running batch (continuous batching), oldest first; it
        stops at the first live row that does not fit, so a row of another adapter is not passed
        over forever: the batch then drains and that row's batch comes next."""
        with self.cv:
            taken = []
            while self.pending and len(taken) < n:
                r = self.pending[0]
                if r.cancelled.is_set():
                    self.pending.popleft()
                    continue
                if not fits(r):
                    break
                taken.append(self.pending.popleft())
            if taken:
                self.current = [r for r in self.current if r.finish_reason is None] + taken
                self.running = len(self.current)
            return taken

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            start = time.monotonic()
            try:
                self.decoder.decode(batch, admit=self._admit if self.continuous else None)
            except Exception as exc:  # the rows were told; the server keeps serving
                self.stats["batch_errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self.last_batch_seconds = time.monotonic() - start
                with self.cv:
                    self.running = 0
                    self.current = []
                    self.free_since = time.monotonic()
                    self.cv.notify_all()

