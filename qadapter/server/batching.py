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
under a 0 mask to the longer one (:meth:`qadapter.generation._FastEngine.adopt`), and finished
rows leave. Left padding under a 0 mask changes no row's attention or positions, so the exactness
above holds for rows that join (tests/test_server_batching.py checks tokens against decoding
alone). A request therefore waits at most one token of the running batch plus its own prefill,
not the whole batch. Stacks and the reference engine (layers the fast engine cannot split) keep
dynamic batching.

Why one module of ~500 lines: the decoder's loop, the row state it keeps and the scheduler that
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
from ..stack import stack_logits

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

    def _engine(self, adapter_name: str | None, batch: int, adapter_only: bool = False):
        """A fast (or, where the adapter cannot share a batch, reference) engine that returns the raw
        (adapter logits, base logits) of every row instead of one policy's logits; ``adapter_only``:
        (adapter logits, None), one branch (every row's policy is a per-row constant away from
        scaled adapter logits, :func:`qadapter.generation._one_branch`)."""
        if adapter_name is None:
            policy, parameterization = "base", "full"
        else:
            served = self.served.adapters[adapter_name]
            self.model.set_adapter(served.peft_name)
            policy, parameterization = ("adapter", "full") if adapter_only else ("customized", "residual")
        # the α's only choose the branches here (compose is replaced): α0 ≠ q_scale runs both
        fast = G._fast_supported(self.model, policy, 0.5, parameterization, 1.0)
        Engine = G._FastEngine if fast else G._ReferenceEngine
        engine = Engine(self.model, policy, 0.5, 1.0, batch, parameterization, 1.0)
        engine.compose = lambda q, base: (q, base)
        return engine

    def _stack_engine(self, stack, batch: int, all_ones: bool):
        """A stack's fast engine (or its reference engine, where some LoRA layer is not plain) that
        returns the raw branches [z_0, ..., z_k] (``all_ones``: [z_k]) instead of one policy's logits."""
        from ..stack import StackFastEngine, StackReferenceEngine, _stack_plan

        # only the stack's adapters active: a LoRA layer the fast engine does not replace (it holds none of
        # the stack's adapters) must not apply another served adapter
        stack._activate(len(stack))
        strengths = [1.0 if all_ones else 0.5] * len(stack)  # only chooses the branches: compose is replaced
        Engine = StackFastEngine if _stack_plan(stack) is not None else StackReferenceEngine
        engine = Engine(stack, "customized", strengths, batch)
        engine._compose = lambda levels: levels
        return engine

    def decode(self, rows: list[Row], admit: Callable[[Callable[[Row], bool], int], list[Row]] | None = None) -> None:
        """Decode ``rows`` in one batch until every row is finished; ``admit(fits, n)`` (continuous
        batching) is asked between two tokens for up to ``n`` more rows that ``fits`` accepts: they
        are prefilled by themselves and join the running batch (:meth:`_FastEngine.adopt`), and
        finished rows leave it then."""
        adapters = {r.adapter for r in rows if r.adapter is not None}
        if len(adapters) > 1:
            raise ValueError(f"one batch decodes one adapter, got {sorted(adapters)}")
        adapter = next(iter(adapters), None)
        settings = self.served.adapters[adapter].settings if adapter else None
        stack = self.served.adapters[adapter].stack if adapter else None

        def key_of(r):  # rows grouped by policy: None = base, else (α0, α̃) (a stack: its strengths)
            return r.strengths if stack is not None and r.adapter is not None else r.alphas

        # every row customized at α0 = q_scale (the tied default at strength 1, or a full Q̂ at α0 = 0):
        # the base branch changes nothing the loop sees, so the batch runs the adapter branch alone
        # (a stack: every row at all strengths 1 runs z_k, the network with every adapter, alone)
        def one_branch(alphas) -> bool:  # a customized row the adapter branch alone decodes
            return G._one_branch("customized", alphas[0], settings.parameterization, settings.q_scale)

        keys = {key_of(r) for r in rows}
        if stack is not None:
            adapter_only = None not in keys and all(all(x == 1.0 for x in key) for key in keys)
        else:
            adapter_only = settings is not None and None not in keys and all(one_branch(k) for k in keys)

        def fits(r: Row) -> bool:
            """Whether a waiting row can join this batch: the same engine serves it."""
            if r.cancelled.is_set() or stack is not None:
                return False
            if adapter is None or r.adapter is None:
                return r.adapter is None and (adapter is None or not adapter_only)
            return r.adapter == adapter and (not adapter_only or one_branch(r.alphas))

        state = {}  # the batch's rows and their per-row decoding state, rebuilt when rows join

        def setup(batch_rows):
            B = len(batch_rows)
            groups = collections.defaultdict(list)
            for i, r in enumerate(batch_rows):
                groups[key_of(r)].append(i)
            state.update(rows=batch_rows, B=B, groups={k: torch.tensor(v, device=self.device) for k, v in groups.items()},
                         greedy=torch.tensor([i for i, r in enumerate(batch_rows) if r.temperature <= 0],
                                             dtype=torch.long, device=self.device),
                         sampled=[i for i, r in enumerate(batch_rows) if r.temperature > 0])

        def prepare(r: Row):
            """A row's own decoding state: its text, and its sampler (seeded per request)."""
            r._text = _Text(self.tokenizer, self.served.tokenizer_lock, r.stop)
            r._processors = None
            r._generator = None
            if r.temperature > 0:
                r._processors = G._logits_processors(len(r.prompt_ids), 0, self.eos, self.device, True,
                                                     r.temperature, r.top_k, r.top_p)
                if r.seed is not None:
                    r._generator = torch.Generator(device=self.device)
                    r._generator.manual_seed(int(r.seed))

        def compose_stack(levels):
            """Per row group, the stacked policy's logits from the branches z_0..z_k (or z_k alone)."""
            if adapter_only:
                return levels[0]
            out = torch.empty_like(levels[0])
            for key, idx in state["groups"].items():
                whole = len(idx) == state["B"]
                parts = levels if whole else [z[idx] for z in levels]
                logits = parts[0] if key is None else stack_logits(parts, key)
                if whole:
                    return logits
                out[idx] = logits
            return out

        def compose(q, base):
            groups, B = state["groups"], state["B"]
            if len(groups) == 1 and None in groups:
                return base
            out = torch.empty_like(q if base is None else base)
            for alphas, idx in groups.items():
                whole = len(idx) == B
                z = q if whole else q[idx]
                if alphas is None:
                    logits = base if whole else base[idx]
                elif base is None:
                    logits = adapter_only_logits(z, settings.parameterization, settings.q_scale, alphas[1])
                else:
                    logits = customized_logits(z, base if whole else base[idx], parameterization=settings.parameterization,
                                               q_scale=settings.q_scale, alpha_0=alphas[0], alpha_tilde=alphas[1])
                if whole:
                    return logits
                out[idx] = logits
            return out

        combine = compose_stack if stack is not None else (lambda branches: compose(*branches))

        def new_engine(B):
            return self._stack_engine(stack, B, adapter_only) if stack is not None else self._engine(adapter, B, adapter_only)

        def prefill(batch_rows):
            """A new engine with ``batch_rows`` prefilled, and the raw branches for their first token."""
            input_ids, attention_mask = G.left_pad([r.prompt_ids for r in batch_rows], self.pad_id, self.device)
            budget = max(r.max_new_tokens for r in batch_rows)
            engine = new_engine(len(batch_rows))
            try:
                return engine, engine.prefill(input_ids, attention_mask, input_ids.shape[1] + budget)
            except BaseException:
                engine.close()
                raise

        was_training = self.model.training
        self.model.eval()
        for r in rows:
            prepare(r)
        setup(rows)
        self.stats["adapter_only_batches"] += int(adapter_only)
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
        engine = None
        everyone = list(rows)  # every row this call decodes, newcomers included: all are told of an error
        eos_t = torch.tensor(self.eos, dtype=torch.long, device=self.device) if self.eos else None
        pad_t = torch.tensor(self.pad_id, dtype=torch.long, device=self.device)
        try:
            with torch.inference_mode():
                engine, raw = prefill(rows)
                logits = combine(raw)
                while True:
                    batch_rows, B = state["rows"], state["B"]
                    tokens = torch.empty(B, dtype=torch.long, device=self.device)
                    greedy = state["greedy"]
                    if len(greedy):
                        tokens[greedy] = logits[greedy].argmax(dim=-1)
                    for i in state["sampled"]:
                        r = batch_rows[i]
                        ids = torch.tensor([r.prompt_ids + r.new_ids], dtype=torch.long, device=self.device)
                        scores = r._processors(ids, logits[i:i + 1])
                        probs = torch.softmax(scores, dim=-1)
                        tokens[i] = torch.multinomial(probs, num_samples=1, generator=r._generator)[0, 0]
                    for r in batch_rows:  # cancelled rows stop here, before their token counts
                        if r.finish_reason is None and r.cancelled.is_set():
                            r.finish_reason = FINISH_CANCELLED
                            self.stats["rows_cancelled"] += 1
                    active = [r.finish_reason is None for r in batch_rows]
                    tokens = torch.where(torch.tensor(active, device=self.device), tokens, pad_t)
                    is_eos = torch.isin(tokens, eos_t).tolist() if eos_t is not None else [False] * B
                    token_list = tokens.tolist()
                    for i, r in enumerate(batch_rows):
                        if not active[i]:
                            continue
                        r.new_ids.append(token_list[i])
                        self.stats["tokens"] += 1
                        out_of_budget = len(r.new_ids) >= r.max_new_tokens
                        delta, hit = r._text.update(r, final=is_eos[i] or out_of_budget)
                        if delta:
                            r.emit(("delta", delta))
                        if is_eos[i] or hit or out_of_budget:
                            r.finish_reason = FINISH_STOP if (is_eos[i] or hit) else FINISH_LENGTH
                            r.emit(("done", r.finish_reason, len(r.new_ids)))
                    live = [i for i, r in enumerate(batch_rows) if r.finish_reason is None]
                    joining = []
                    if admit is not None and hasattr(engine, "adopt") and engine.can_adopt():
                        joining = admit(fits, self.max_rows - len(live)) if self.max_rows > len(live) else []
                        everyone.extend(joining)
                    if not live and not joining:
                        break
                    raw = engine.step(tokens) if live else None
                    if joining:  # continuous batching: the live rows and the newcomers continue as one batch
                        for r in joining:
                            prepare(r)
                        fresh, fresh_raw = prefill(joining)
                        # closed before the merged engine is built: an engine's contexts (the base
                        # engine's disable_adapter) do not nest; adopt() reads only their tensors
                        fresh.close()
                        engine.close()
                        kept = [batch_rows[i] for i in live]
                        budget = max(r.max_new_tokens - len(r.new_ids) for r in kept + joining)
                        merged = new_engine(len(kept) + len(joining))
                        merged.adopt(([(engine, live)] if live else []) + [(fresh, list(range(len(joining))))],
                                     max(engine.length, fresh.length) + budget + 1)
                        def join(old, new):  # one branch's logits: the live rows' next, then the newcomers' first
                            if old is None:
                                return new
                            return torch.cat([old.index_select(0, torch.tensor(live, device=old.device)), new])

                        raw = [join(x, y) for x, y in zip(raw if raw is not None else [None] * len(fresh_raw), fresh_raw)]
                        engine = merged
                        setup(kept + joining)
                        self.stats["rows"] += len(joining)
                        self.stats["rows_joined_running_batch"] += len(joining)
                        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], state["B"])
                    logits = combine(raw)
        except BaseException as exc:
            for r in everyone:
                if r.finish_reason is None:
                    r.finish_reason = FINISH_ERROR
                    r.emit(("error", f"decoding failed: {type(exc).__name__}: {exc}"))
            raise
        finally:
            if engine is not None:
                engine.close()
            if was_training:
                self.model.train()


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

