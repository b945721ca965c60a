"""Decoding from the customized policy π̃ of eq. (1), with Hugging Face ``generate()`` semantics.

    π̃(a|s) = softmax_a((Q̂(s,a) + α0 · log π1(a|s)) / α̃)

Q̂ = the logits of the model *with* the LoRA adapter, log π1 = the log-softmax of the *same* model with
the adapter disabled. Every step needs both, so a naive loop runs the network twice per token.

Two interchangeable engines produce the next-token logits; everything else (prompt handling, logits
processors, sampling, stopping, streaming, output) is one shared loop, so the two engines differ in
nothing but how the logits are computed:

* **fast** (default): ONE forward per token for BOTH branches, with ONE KV cache. The batch holds
  every prompt twice: rows ``0..B-1`` are the base branch (π1), rows ``B..2B-1`` the adapter branch
  (Q̂). During each forward every LoRA ``Linear`` computes ``base_layer(x)`` for all rows and adds
  ``lora_B(lora_A(x)) · scaling`` to the adapter rows only (:class:`SplitRows`), so the base
  weights are read once per step for both branches. Every row computes exactly what it would
  compute alone: in a decoder nothing mixes batch rows (attention, norms and MLPs are per row, the
  KV cache is per row), and the per-row operations are PEFT's own. Layers :class:`SplitRows` does
  not handle (LoRA on embeddings, LoRA variants) use PEFT's mixed-adapter batch
  (``adapter_names=["__base__"]*B + [adapter]*B``), the same computation with more per-step
  overhead; where PEFT cannot mix either (DoRA, merged adapters) decoding falls back to the
  reference engine. Policies that need one branch only (``"base"``, ``"adapter"``, ``"customized"``
  with a full Q̂ and α0 = 0, where log π1 does not enter eq. (1), or with a residual Q̂ and
  α0 = q_scale, the tied default at strength 1, where π̃ = softmax((q_scale/α̃)·zθ)) run B rows.
* **reference** (``fast=False``): two separate forwards per token through the public PEFT model, each
  branch with its own KV cache (adapter enabled, then inside ``disable_adapter()``).

Both engines compute the same function; in floating point their logits agree to rounding (bitwise
in our checks at batch >= 2; ~1e-5 at batch 1, where the matrix kernels for one row and for two rows
sum in different orders; on the CPU the two-branch products take the operand order measured faster,
:mod:`qadapter.products`, also equal to rounding), and they produce identical tokens (the tests check
this, and also against a cache-free full recompute of eq. (1) at every step). A model must not be
used by other code while ``generate`` runs on it (its LoRA layers are switched per forward, as PEFT's
own ``disable_adapter()`` does).

Special settings (see ``docs/generation.md``): ``policy="base"`` samples π1 itself (the adapter
disabled; identical to the base model's own ``generate()``); ``policy="adapter"`` samples
softmax(Q̂) (the adapter model's own ``generate()``), as does ``policy="customized"`` with α0 = 0,
α̃ = 1; with an untrained adapter (Q̂ = base logits) ``"customized"`` is π1 sharpened by
(1 + α0)/α̃, so α̃ = 1 + α0 recovers π1 exactly in distribution.

The public engine API, which :func:`generate` and the server's decoder (:mod:`qadapter.server.batching`)
both use, so there is ONE decode-step loop: :func:`make_engine` / :func:`branches_engine` (prefill,
one step; :meth:`FastEngine.adopt` moves rows between engines), :func:`row_composer` (each row of a
batch composed with its own settings), :class:`Sampler` (greedy or sampled, per-row or shared
processors and generator), :class:`DecodeRow` and :class:`Batch` (rows joining and leaving a running
batch's KV cache) and :func:`decode`, the loop.

Why one module of ~730 lines: the fast engine and the reference engine are the two halves of one
exactness claim (same tokens), and the decoding loop they share; splitting them would spread it.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .backbone import (active_adapter, eos_token_ids, fast_plan, inner_model, is_peft, pad_token_id, projection_head,
                       replaced_forward, ReplacedForwards, SplitRows)
from .chat import encode_prompt, normalize_prompts
from .objective import adapter_only_logits, customized_logits
from .products import LinearForwards, small_products

POLICIES = ("customized", "base", "adapter")

def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id rows to a (B, P) batch; returns (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError("empty prompt")
        ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------- models


def _cache_kwarg(inner) -> str:
    """transformers >= 5 names the cache argument ``cache``; older versions ``past_key_values``."""
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(inner):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=inner.config)
    except TypeError:  # older transformers
        return DynamicCache()


# ----------------------------------------------------------------------------------------- engines


def one_branch(policy: str, alpha_0: float, parameterization: str, q_scale: float = 1.0) -> bool:
    """Whether the policy needs only one branch: π1 alone, softmax(zθ) alone, a full Q̂ with α0 = 0
    (log π1 does not enter eq. 1), or a residual Q̂ with α0 = q_scale, the tied default at strength 1:
    there eq. (1) is q_scale·(zθ − z1 + log π1)/α̃ = (q_scale/α̃)·zθ − (q_scale/α̃)·logsumexp(z1), a
    per-row constant away from (q_scale/α̃)·zθ, so the base logits change nothing the loop sees."""
    if policy != "customized":
        return True
    return alpha_0 == 0.0 if parameterization == "full" else alpha_0 == q_scale


def fast_supported(model, policy: str, alpha_0: float, parameterization: str = "full", q_scale: float = 1.0) -> bool:
    """False only where both branches are needed and the adapter cannot share a batch (DoRA, merged)."""
    if not is_peft(model) or one_branch(policy, alpha_0, parameterization, q_scale):
        return True
    return fast_plan(model, active_adapter(model))[0] != "reference"


class Engine:
    """Produces the next-token logits of the chosen policy, (B, V) float32 (possibly shifted by a
    per-row constant, which no softmax, argmax or logits processor of the loop sees: the fast
    engine's one-projection head, :meth:`FastEngine._mixed_head`).

    ``prefill(input_ids, attention_mask, total_len)`` runs the (B, P) left-padded prompts and returns
    the logits for the first new token; ``step(tokens)`` feeds the (B,) tokens just chosen and returns
    the logits for the next one. Positions ignore the left padding; the attention mask of every
    later token is 1 (as in transformers, finished rows keep being fed padding tokens).
    """

    def __init__(self, model, policy: str, alpha_0: float, alpha_tilde: float, parameterization: str = "full",
                 q_scale: float = 1.0, compose=None):
        self.model = model
        self.inner = inner_model(model)
        self.cache_kw = _cache_kwarg(self.inner)
        self.policy, self.alpha_0, self.alpha_tilde = policy, alpha_0, alpha_tilde
        self.parameterization, self.q_scale = parameterization, q_scale
        self.composer = compose  # compose(q, base) -> logits, per row (row_composer); None: the policy's

    def compose(self, q: torch.Tensor | None, base: torch.Tensor | None) -> torch.Tensor:
        """The policy's logits from the adapter logits ``q`` and the base logits ``base`` (or, with a
        ``compose`` given, what it makes of them: e.g. each row with its own settings)."""
        if self.composer is not None:
            return self.composer(q, base)
        if self.policy == "base":
            return base
        if self.policy == "adapter":
            return q
        if base is None:  # one branch suffices (one_branch): π̃'s logits up to a per-row constant
            return adapter_only_logits(q, self.parameterization, self.q_scale, self.alpha_tilde)
        return customized_logits(q, base, parameterization=self.parameterization, q_scale=self.q_scale,
                                 alpha_0=self.alpha_0, alpha_tilde=self.alpha_tilde)

    def _buffers(self, attention_mask: torch.Tensor, total_len: int, copies: int):
        """(copies·B, total_len) attention mask buffer and the (copies·B, P) prompt positions."""
        B, P = attention_mask.shape
        self.mask = torch.ones((copies * B, total_len), dtype=attention_mask.dtype, device=attention_mask.device)
        self.mask[:, :P] = attention_mask.repeat(copies, 1)
        positions = (self.mask[:, :P].cumsum(-1) - 1).clamp(min=0)
        self.next_pos = positions[:, -1:] + 1
        self.length = P
        return self.mask[:, :P], positions

    def _advance(self):
        """Mask and positions for the token about to be fed (then moves on by one)."""
        self.length += 1
        positions = self.next_pos
        self.next_pos = positions + 1
        return self.mask[:, :self.length], positions

    def close(self):
        pass


class FastEngine(Engine):
    """One forward per token for both branches, one KV cache (see the module docstring)."""

    def __init__(self, model, policy, alpha_0, alpha_tilde, batch_size: int, parameterization="full", q_scale=1.0,
                 compose=None):
        super().__init__(model, policy, alpha_0, alpha_tilde, parameterization, q_scale, compose)
        self.B = batch_size
        peft = is_peft(model)
        if policy == "base" or not peft:
            self.branches = ("base",)
        elif one_branch(policy, alpha_0, parameterization, q_scale):
            self.branches = ("adapter",)
        else:
            self.branches = ("base", "adapter")
        self.two = len(self.branches) == 2
        self.cache = new_cache(self.inner)
        self._stack = contextlib.ExitStack()
        self.adapter_names = None
        self.context = contextlib.nullcontext()  # entered around every forward
        # two branches on the CPU: the 2B-row products in the operand order measured faster on this
        # machine (qadapter.products; equal to rounding); one branch stays bit-equal to PEFT's forward
        self.products = small_products(self.inner) if self.two else None
        linear = self.products or F.linear
        if self.products is not None:
            self.products.prepare(2 * self.B, self.B)  # the steps' rows and the mixed head's
            self.context = LinearForwards(self.products.modules, self.products)
        if peft and self.branches == ("base",):
            self._stack.enter_context(model.disable_adapter())
        elif peft:
            adapter = active_adapter(model)
            plan, layers = fast_plan(model, adapter)
            if plan == "split":
                # the adapter on rows B: (two branches) or on every row (one): PEFT's LoRA arithmetic
                # without its per-call bookkeeping, which costs ~4% of a batch-1 step on a fast CPU
                # (bench/NOTES.md); bit-equal to PEFT's forward
                split = SplitRows(layers, self.B if self.two else 0, adapter, linear)
                # with the plain linears' forwards (LinearForwards), one context swaps both sets
                self.context = split if self.products is None else ReplacedForwards(
                    split.forwards + self.context.forwards)
            elif self.two:  # PEFT's own mixed-adapter batch (fast_supported refused "reference")
                self.adapter_names = ["__base__"] * self.B + [adapter] * self.B
        self.mixed_head = self._mixed_head() if self.two and policy == "customized" and compose is None else None

    def _mixed_head(self):
        """π̃'s logits straight from the hidden states, with ONE vocabulary projection for both branches.

        The output embedding is linear, z = W·h + b, and eq. (1) is linear in the two branches' logits
        up to a per-row constant: (Q̂ + α0·log π1)/α̃ = (a·zθ + c·z1)/α̃ − α0·logsumexp(z1)/α̃ with
        (a, c) = (1, α0) for a full Q̂ and (q_scale, α0 − q_scale) for a residual one. So
        W·(a·hθ + c·h1)/α̃ + (a + c)·b/α̃ are π̃'s logits shifted by a per-row constant, which changes
        nothing the decoding loop does with them (softmax, argmax, temperature, top-k, top-p, the -inf
        of min_new_tokens). That projects B rows instead of 2B, and no log-softmax over the base row.
        None (compose the two branches' logits) where the head is not a plain ``nn.Linear`` without
        hooks or logit post-processing, or where the caller gave its own ``compose`` (it wants the raw
        logits of both branches).
        """
        head = projection_head(self.model)
        if head is None:
            return None
        parameterization, q_scale = getattr(self, "parameterization", "full"), getattr(self, "q_scale", 1.0)
        a, c = (1.0, self.alpha_0) if parameterization == "full" else (q_scale, self.alpha_0 - q_scale)
        a, c, B = a / self.alpha_tilde, c / self.alpha_tilde, self.B
        weight, bias = head.weight, head.bias
        linear = getattr(self, "products", None) or F.linear
        bias = None if bias is None else bias * (a + c)

        def forward(hidden):  # (2B, 1, H): base rows, then adapter rows
            mixed = torch.mul(hidden[B:].float(), a)  # a new (B, 1, H) tensor, also for a = 1
            if c != 0.0:
                mixed.add_(hidden[:B].float(), alpha=c)
            return linear(mixed.to(weight.dtype), weight, bias)

        return head, forward

    def _forward(self, ids, mask, positions):
        kwargs = {self.cache_kw: self.cache}
        mixed = self.mixed_head
        head = contextlib.nullcontext() if mixed is None else replaced_forward(*mixed)
        if self.adapter_names is not None:
            with self.context, head:
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 logits_to_keep=1, adapter_names=self.adapter_names, **kwargs)
        else:
            with self.context, head:
                out = self.inner(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 logits_to_keep=1, **kwargs)
        logits = out.logits[:, -1].float()
        if mixed is not None:  # already π̃'s logits (up to a per-row constant)
            return logits
        if self.two:
            return self.compose(logits[self.B:], logits[:self.B])
        if self.branches == ("base",):
            return self.compose(None, logits)
        return self.compose(logits, None)

    def prefill(self, input_ids, attention_mask, total_len):
        copies = 2 if self.two else 1
        mask, positions = self._buffers(attention_mask, total_len, copies)
        return self._forward(input_ids.repeat(copies, 1) if self.two else input_ids, mask, positions)

    def step(self, tokens):
        mask, positions = self._advance()
        ids = (tokens.repeat(2) if self.two else tokens)[:, None]
        return self._forward(ids, mask, positions)

    def can_adopt(self) -> bool:
        """Whether :meth:`adopt` can move this engine's rows: a cache of plain full-attention layers."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    def adopt(self, parts, total_len: int) -> None:
        """Continue the rows of other engines (continuous batching): this fresh engine, built for
        B = Σ len(rows) rows with the same branches, takes over their KV caches, masks and positions.

        ``parts``: [(engine, row indices)], in the order of this engine's rows (every engine already
        prefilled, :meth:`can_adopt`). Each branch's rows form one block of B (base rows first, as
        :meth:`prefill` lays them out), so rows are picked per block. Rows whose cache is shorter
        are left-padded with zeros under a 0 mask: attention gives them weight exactly 0 and the
        positions (counted on the mask) do not change, so every row decodes what it decoded before.
        ``total_len``: the mask's length, ≥ the longest cache + the tokens still to feed.
        """
        copies = 2 if self.two else 1
        if sum(len(rows) for _, rows in parts) != self.B or any(e.branches != self.branches for e, _ in parts):
            raise ValueError("adopt: the parts' rows must fill this engine and run the same branches")
        L = max(e.length for e, _ in parts)
        picks = [(e, torch.tensor([c * e.B + i for i in rows], dtype=torch.long, device=e.mask.device))
                 for c in range(copies) for e, rows in parts]  # block by block: this engine's row order

        def gather(tensor_of, dim_len):  # (rows, ..., T, ...) pieces, left-padded to L along dim_len
            out = []
            for e, idx in picks:
                t = tensor_of(e).index_select(0, idx)
                pad = L - e.length
                if pad:
                    shape = list(t.shape)
                    shape[dim_len] = pad
                    t = torch.cat([t.new_zeros(shape), t], dim=dim_len)
                out.append(t)
            return torch.cat(out)

        mask = gather(lambda e: e.mask[:, :e.length], 1)
        self.mask = torch.ones((mask.shape[0], total_len), dtype=mask.dtype, device=mask.device)
        self.mask[:, :L] = mask
        self.next_pos = torch.cat([e.next_pos.index_select(0, idx) for e, idx in picks])
        self.length = L
        self.cache = new_cache(self.inner)
        for j in range(len(parts[0][0].cache.layers)):
            keys = gather(lambda e: e.cache.layers[j].keys, 2)
            values = gather(lambda e: e.cache.layers[j].values, 2)
            self.cache.update(keys, values, j)

    def close(self):
        self._stack.close()


class ReferenceEngine(Engine):
    """Two separate forwards per token through the public PEFT model, one KV cache per branch."""

    def __init__(self, model, policy, alpha_0, alpha_tilde, batch_size: int, parameterization="full", q_scale=1.0,
                 compose=None):
        super().__init__(model, policy, alpha_0, alpha_tilde, parameterization, q_scale, compose)
        self.peft = is_peft(model)
        self.need_q = policy != "base"
        self.need_base = policy != "adapter"
        self.cache_q, self.cache_base = new_cache(self.inner), new_cache(self.inner)

    def _run(self, cache, ids, mask, positions):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: cache})
        return out.logits[:, -1].float()

    def _both(self, ids, mask, positions):
        q = self._run(self.cache_q, ids, mask, positions) if self.need_q else None
        base = None
        if self.need_base:
            with self.model.disable_adapter() if self.peft else contextlib.nullcontext():
                base = self._run(self.cache_base, ids, mask, positions)
        return self.compose(q, base)

    def prefill(self, input_ids, attention_mask, total_len):
        mask, positions = self._buffers(attention_mask, total_len, 1)
        return self._both(input_ids, mask, positions)

    def step(self, tokens):
        mask, positions = self._advance()
        return self._both(tokens[:, None], mask, positions)


# ----------------------------------------------------------------------------------------- the public engine API


def make_engine(model, policy: str, alpha_0: float, alpha_tilde: float, batch_size: int, *,
                parameterization: str = "full", q_scale: float = 1.0, fast: bool = True, compose=None) -> Engine:
    """The engine for ``batch_size`` rows of one policy: the fast one where it can serve the model
    (:func:`fast_supported`), else the reference one. ``prefill(input_ids, attention_mask, total_len)``
    and ``step(tokens)`` return the next-token logits (B, V); ``close()`` ends it. ``compose(q, base)``,
    if given, makes the logits from the raw adapter and base logits instead of the policy (e.g.
    :func:`row_composer`: every row with its own settings)."""
    if fast and fast_supported(model, policy, alpha_0, parameterization, q_scale):
        return FastEngine(model, policy, float(alpha_0), float(alpha_tilde), batch_size, parameterization,
                          float(q_scale), compose)
    return ReferenceEngine(model, policy, float(alpha_0), float(alpha_tilde), batch_size, parameterization,
                           float(q_scale), compose)


def branches_engine(model, branches: tuple[str, ...], batch_size: int, compose, fast: bool = True) -> Engine:
    """An engine that runs the given ``branches`` of every row (``("base",)``, ``("adapter",)`` or both)
    and hands their raw logits to ``compose(q, base)`` (None for a branch not run): for batches whose
    rows each have their own policy (the server's decoder)."""
    if branches == ("base",):
        policy, alpha_0, parameterization = "base", 0.0, "full"
    elif branches == ("adapter",):
        policy, alpha_0, parameterization = "adapter", 0.0, "full"
    else:  # a residual Q̂ at α0 ≠ q_scale needs both branches (one_branch)
        policy, alpha_0, parameterization = "customized", 0.5, "residual"
    return make_engine(model, policy, alpha_0, 1.0, batch_size, parameterization=parameterization, q_scale=1.0,
                       fast=fast, compose=compose)


def row_composer(keys: Sequence, compose_one):
    """``compose(*branches)`` for a batch whose row i has the settings ``keys[i]`` (hashable: e.g.
    (α0, α̃), a stack's strengths, or None for the base model): each group of rows with equal keys is
    composed by ``compose_one(key, *branches_of_those_rows)`` (a branch not run is None). A batch of
    one group is composed whole (no indexing), as a single-policy engine would."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    if len(groups) == 1:
        key = next(iter(groups))
        return lambda *branches: compose_one(key, *branches)
    index = None

    def compose(*branches):
        nonlocal index
        device = next(b for b in branches if b is not None).device
        if index is None:
            index = {key: torch.tensor(rows, device=device) for key, rows in groups.items()}
        out = None
        for key, idx in index.items():
            part = compose_one(key, *[None if b is None else b[idx] for b in branches])
            if out is None:
                out = part.new_empty((len(keys),) + tuple(part.shape[1:]))
            out[idx] = part
        return out

    return compose


def logits_processors(prompt_len, min_new_tokens, eos, device, do_sample, temperature, top_k, top_p):
    """transformers' logits processors for one sampler, in transformers' order."""
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if min_new_tokens and eos:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, min_new_tokens, eos, device=device))
    if do_sample:  # same order as transformers' generate()
        if temperature is not None and temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            procs.append(TopKLogitsWarper(top_k=top_k))
        if top_p is not None and top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=top_p))
    return procs


@dataclass(eq=False)
class Sampler:
    """How rows pick their next token: greedy (argmax) or sampled, after ``processors`` (a
    ``LogitsProcessorList`` or None), drawing from ``generator`` (None: torch's global RNG). Rows that
    share one sampler are picked together (one ``torch.multinomial`` over their rows, as transformers)."""

    do_sample: bool = False
    processors: object = None
    generator: torch.Generator | None = None

    @classmethod
    def build(cls, *, do_sample: bool, prompt_len: int, device, eos=(), min_new_tokens: int = 0,
              temperature: float | None = 1.0, top_k: int | None = None, top_p: float | None = None,
              seed: int | None = None) -> "Sampler":
        """A sampler with transformers' processors and, with ``seed``, its own seeded generator."""
        procs = logits_processors(prompt_len, min_new_tokens, list(eos), device, do_sample, temperature, top_k, top_p)
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
        return cls(do_sample, procs or None, generator)

    def pick(self, logits: torch.Tensor, seqs) -> torch.Tensor:
        """(n,) tokens from (n, V) logits; ``seqs()`` gives the rows' ids so far (for the processors)."""
        scores = self.processors(seqs(), logits) if self.processors is not None else logits
        if self.do_sample:
            return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1, generator=self.generator).squeeze(1)
        return scores.argmax(dim=-1)


GREEDY = Sampler()


class DecodeRow:
    """One prompt in a running batch: its ids, token budget, settings key (for :func:`row_composer`)
    and :class:`Sampler`. ``ids`` holds the prompt and every token fed (padding once finished, as
    transformers feeds finished rows); ``new_ids`` the row's own new tokens. Subclasses say when a
    row ends (:meth:`accept`) or is dropped (:meth:`cancelled`)."""

    def __init__(self, prompt_ids: Sequence[int], max_new_tokens: int, key=None, sampler: Sampler = GREEDY):
        self.prompt_ids, self.max_new_tokens, self.key, self.sampler = list(prompt_ids), max_new_tokens, key, sampler
        self.ids = list(prompt_ids)
        self.new_ids: list[int] = []
        self.finished = False

    def cancelled(self) -> bool:
        """Checked before each token counts: True ends the row there (its token is not kept)."""
        return False

    def accept(self, token: int, is_eos: bool) -> bool:
        """Take the row's new token; True when the row ends with it."""
        self.new_ids.append(token)
        return is_eos or len(self.new_ids) >= self.max_new_tokens


class Batch:
    """The rows decoded together and their engine: prefill, one step, rows joining and leaving.

    ``new_engine(rows)`` builds the engine for a list of rows (it composes each row by its key).
    Rows join a running batch where the engine can move rows (:meth:`FastEngine.can_adopt`): the
    newcomers are prefilled by themselves, then a fresh engine adopts the live rows' and the
    newcomers' KV caches (:meth:`FastEngine.adopt`), and finished rows leave.
    """

    def __init__(self, new_engine, rows: list[DecodeRow], pad_id: int, device):
        self.new_engine, self.pad_id, self.device = new_engine, pad_id, device
        self.engine, self.logits = self._prefilled(rows)
        self._use(rows)

    def _use(self, rows):
        self.rows = rows
        groups: dict = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.sampler, []).append(i)
        self.samplers = [(s, None if len(idx) == len(rows) else torch.tensor(idx, device=self.device))
                         for s, idx in groups.items()]

    def _prefilled(self, rows):
        input_ids, attention_mask = left_pad([r.prompt_ids for r in rows], self.pad_id, self.device)
        engine = self.new_engine(rows)
        try:
            budget = max(r.max_new_tokens - len(r.new_ids) for r in rows)
            return engine, engine.prefill(input_ids, attention_mask, input_ids.shape[1] + budget)
        except BaseException:
            engine.close()
            raise

    def pick(self) -> torch.Tensor:
        """Every row's next token, each by its sampler (finished rows' tokens are replaced later)."""
        tokens = None
        for sampler, idx in self.samplers:
            rows = self.rows if idx is None else [self.rows[i] for i in idx.tolist()]
            chosen = sampler.pick(self.logits if idx is None else self.logits[idx],
                                  lambda: left_pad([r.ids for r in rows], self.pad_id, self.device)[0])
            if idx is None:
                return chosen
            if tokens is None:
                tokens = torch.empty(len(self.rows), dtype=torch.long, device=self.device)
            tokens[idx] = chosen
        return tokens

    def live(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if not r.finished]

    def can_join(self) -> bool:
        return hasattr(self.engine, "adopt") and self.engine.can_adopt()

    def step(self, tokens: torch.Tensor, joining: list[DecodeRow]) -> None:
        """Feed the step's tokens to the live rows and take in ``joining``; the logits for the next
        token of every row that stays are then in :attr:`logits`."""
        live = self.live()
        logits = self.engine.step(tokens) if live else None
        if joining:
            fresh, fresh_logits = self._prefilled(joining)
            # closed before the merged engine is built: an engine's contexts (the base engine's
            # disable_adapter) do not nest; adopt() reads only their tensors
            fresh.close()
            self.engine.close()
            kept = [self.rows[i] for i in live]
            budget = max(r.max_new_tokens - len(r.new_ids) for r in kept + joining)
            merged = self.new_engine(kept + joining)
            merged.adopt(([(self.engine, live)] if live else []) + [(fresh, list(range(len(joining))))],
                         max(self.engine.length, fresh.length) + budget + 1)
            self.engine = merged
            logits = fresh_logits if not live else _join(logits, live, fresh_logits)
            self._use(kept + joining)
        self.logits = logits

    def close(self):
        self.engine.close()


def _join(old, live, new):
    """The live rows' next logits, then the newcomers' first (raw branches: a tuple, None where not run)."""
    if isinstance(new, torch.Tensor):
        return torch.cat([old.index_select(0, torch.tensor(live, device=old.device)), new])
    return type(new)(n if o is None else _join(o, live, n) for o, n in zip(old, new))


def decode(new_engine, rows: list[DecodeRow], *, eos: Sequence[int], pad_id: int, device, on_step=None,
           admit=None) -> None:
    """THE decode-step loop (``generate`` and the server's decoder): prefill ``rows``, then per step
    pick every row's token (:class:`Sampler`), let each row take it (:meth:`DecodeRow.accept`), and
    feed the tokens until every row is finished. ``on_step(tokens)``: the (B,) tokens of each step
    (padding for finished rows). ``admit(n_live)`` (continuous batching) is asked between two tokens,
    where the engine can move rows, for rows to join the ``n_live`` live ones (a list, maybe empty)."""
    eos_t = torch.tensor(list(eos), dtype=torch.long, device=device) if eos else None
    pad_t = torch.tensor(pad_id, dtype=torch.long, device=device)
    with torch.inference_mode():
        batch = Batch(new_engine, rows, pad_id, device)
        try:
            while True:
                tokens = batch.pick()
                for r in batch.rows:  # cancelled rows stop here, before their token counts
                    if not r.finished and r.cancelled():
                        r.finished = True
                active = [not r.finished for r in batch.rows]
                if not all(active):
                    tokens = torch.where(torch.tensor(active, device=device), tokens, pad_t)
                if on_step is not None:
                    on_step(tokens)
                is_eos = torch.isin(tokens, eos_t).tolist() if eos_t is not None else [False] * len(active)
                for r, token, on, end in zip(batch.rows, tokens.tolist(), active, is_eos):
                    r.ids.append(token)
                    if on and r.accept(token, end):
                        r.finished = True
                live = batch.live()
                joining = admit(len(live)) if admit is not None and batch.can_join() else []
                if not live and not joining:
                    return
                batch.step(tokens, joining)
        finally:
            batch.close()


# ----------------------------------------------------------------------------------------- generate


class _GenerateRow(DecodeRow):
    """A row of :func:`generate`: it also ends at a stop string (transformers' ``StopStringCriteria``)."""

    def __init__(self, prompt_ids, max_new_tokens, sampler, stop, device):
        super().__init__(prompt_ids, max_new_tokens, None, sampler)
        self.stop, self.device = stop, device

    def accept(self, token, is_eos):
        end = super().accept(token, is_eos)
        if not end and self.stop is not None:
            end = bool(self.stop(torch.tensor([self.ids], device=self.device), None)[0])
        return end


def generate(model, tokenizer, prompts, *, alpha_0: float, alpha_tilde: float, max_new_tokens: int = 128,
             min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, stop_strings: str | Sequence[str] | None = None, streamer=None,
             seed: int | None = None, fast: bool = True, return_ids: bool = False, policy: str = "customized",
             eos_token_id: int | Sequence[int] | None = None, raw_text: bool = False,
             parameterization: str = "full", q_scale: float = 1.0, engine_factory=None):
    """Generate from the customized policy π̃ = softmax((Q̂ + α0·log π1)/α̃) (eq. 1).

    Args:
        model: a ``peft.PeftModel`` (Q̂ = its logits with the active adapter, π1 = with the adapter
            disabled). A plain transformers model is accepted with ``policy="base"``.
        tokenizer: its tokenizer (a chat template is used for messages and strings).
        prompts: one prompt or a list of them. A prompt is a string (a single user turn), a list of
            message dicts (chat template with the generation prompt), or token ids (used as is).
            A 2-D tensor is a batch of (unpadded, equal-length) id rows.
        alpha_0, alpha_tilde: α0 and α̃ of eq. (1) for this call.
        parameterization, q_scale: how Q̂ is made from the two branches' logits
            (:func:`qadapter.objective.q_values`; ``QAdapter.generate`` passes the saved ones). The
            default ``"full"`` reads the adapter logits as Q̂, as this function always has.
        max_new_tokens, min_new_tokens: bounds on the new tokens (the end-of-turn token is suppressed
            until ``min_new_tokens`` are out, as in transformers).
        do_sample, temperature, top_k, top_p: transformers' sampling, applied to the composed logits
            (so the effective temperature is α̃ · temperature). ``top_k=None`` means no top-k filter
            (transformers' ``generate()`` would default to 50). Greedy when ``do_sample`` is False.
        stop_strings: a string or list; a row stops at the token that completes one (transformers'
            ``StopStringCriteria``; the stop string is part of the output, as in transformers).
        streamer: an object with ``put(ids)`` / ``end()`` (transformers' ``TextStreamer`` protocol:
            first the (B, P) prompt ids, then each step's (B,) new tokens).
        seed: seeds a private ``torch.Generator`` for sampling (the global RNG is untouched); without
            it, sampling draws from torch's global RNG exactly like transformers' ``generate()``.
        fast: one forward per token for both branches (default) or the two-forward reference.
        return_ids: also return the new token ids of each prompt.
        policy: ``"customized"`` (π̃), ``"base"`` (π1, adapter disabled) or ``"adapter"`` (softmax Q̂).
        eos_token_id: end-of-turn id(s); default: the generation config's and the tokenizer's.
            ``[]`` disables stopping at an end-of-turn token.
        raw_text: strings are raw text (no chat template; :func:`qadapter.chat.raw_text_ids`), as
            :mod:`qadapter.evaluation`'s policy interface defines them.
        engine_factory: ``engine_factory(batch_size)`` returns the engine that computes the
            next-token logits (``prefill`` / ``step`` / ``close``, as the engines below) instead of
            the built-in choice: how :class:`qadapter.stack.QAdapterStack` decodes its k+1 branches
            through this same loop.
    Returns:
        A list of strings, one per prompt, holding the new text only (special tokens skipped); with
        ``return_ids``, a tuple (texts, ids) where ids are the new token ids of each prompt, up to
        and including the token that ended it.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if alpha_tilde <= 0:
        raise ValueError(f"alpha_tilde must be > 0, got {alpha_tilde}")
    if do_sample and (temperature is None or temperature <= 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not is_peft(model) and policy != "base":
        raise ValueError(f"policy={policy!r} needs a peft.PeftModel (got {type(model).__name__}); use policy='base'")
    if max_new_tokens < 0 or min_new_tokens < 0:
        raise ValueError("max_new_tokens and min_new_tokens must be >= 0")

    prompt_list = normalize_prompts(prompts)
    device = next(inner_model(model).parameters()).device
    eos = eos_token_ids(model, tokenizer, eos_token_id)
    pad_id = pad_token_id(tokenizer, model, eos)
    prompt_rows = [encode_prompt(tokenizer, p, raw_text) for p in prompt_list]
    B = len(prompt_rows)
    if max_new_tokens == 0:
        return ([""] * B, [[] for _ in range(B)]) if return_ids else [""] * B
    input_ids, _ = left_pad(prompt_rows, pad_id)  # the processors see the rows left-padded to one width
    # one sampler for every row: one torch.multinomial per step over the batch, as transformers draws
    sampler = Sampler.build(do_sample=do_sample, prompt_len=input_ids.shape[1], device=device, eos=eos,
                            min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
    stop = None
    if stop_strings:
        from transformers import StopStringCriteria
        stop = StopStringCriteria(tokenizer, [stop_strings] if isinstance(stop_strings, str) else list(stop_strings))
    rows = [_GenerateRow(r, max_new_tokens, sampler, stop, device) for r in prompt_rows]

    def new_engine(batch_rows):
        if engine_factory is not None:
            return engine_factory(len(batch_rows))
        return make_engine(model, policy, alpha_0, alpha_tilde, len(batch_rows), parameterization=parameterization,
                           q_scale=q_scale, fast=fast)

    was_training = model.training
    model.eval()
    try:
        if streamer is not None:
            streamer.put(input_ids.cpu())
        decode(new_engine, rows, eos=eos, pad_id=pad_id, device=device,
               on_step=None if streamer is None else (lambda tokens: streamer.put(tokens.cpu())))
        if streamer is not None:
            streamer.end()
    finally:
        if was_training:
            model.train()
    new_ids = [r.new_ids for r in rows]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
    return (texts, new_ids) if return_ids else texts
