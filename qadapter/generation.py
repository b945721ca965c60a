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

Why one module of ~490 lines: the fast engine and the reference engine are the two halves of one
exactness claim (same tokens), and the decoding loop they share; splitting them would spread it.
"""

from __future__ import annotations

import contextlib
import inspect
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


def _new_cache(inner):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=inner.config)
    except TypeError:  # older transformers
        return DynamicCache()


# ----------------------------------------------------------------------------------------- engines


def _one_branch(policy: str, alpha_0: float, parameterization: str, q_scale: float = 1.0) -> bool:
    """Whether the policy needs only one branch: π1 alone, softmax(zθ) alone, a full Q̂ with α0 = 0
    (log π1 does not enter eq. 1), or a residual Q̂ with α0 = q_scale, the tied default at strength 1:
    there eq. (1) is q_scale·(zθ − z1 + log π1)/α̃ = (q_scale/α̃)·zθ − (q_scale/α̃)·logsumexp(z1), a
    per-row constant away from (q_scale/α̃)·zθ, so the base logits change nothing the loop sees."""
    if policy != "customized":
        return True
    return alpha_0 == 0.0 if parameterization == "full" else alpha_0 == q_scale


def _fast_supported(model, policy: str, alpha_0: float, parameterization: str = "full", q_scale: float = 1.0) -> bool:
    """False only where both branches are needed and the adapter cannot share a batch (DoRA, merged)."""
    if not is_peft(model) or _one_branch(policy, alpha_0, parameterization, q_scale):
        return True
    return fast_plan(model, active_adapter(model))[0] != "reference"


class _Engine:
    """Produces the next-token logits of the chosen policy, (B, V) float32 (possibly shifted by a
    per-row constant, which no softmax, argmax or logits processor of the loop sees: the fast
    engine's one-projection head, :meth:`_FastEngine._mixed_head`).

    ``prefill(input_ids, attention_mask, total_len)`` runs the (B, P) left-padded prompts and returns
    the logits for the first new token; ``step(tokens)`` feeds the (B,) tokens just chosen and returns
    the logits for the next one. Positions ignore the left padding; the attention mask of every
    later token is 1 (as in transformers, finished rows keep being fed padding tokens).
    """

    def __init__(self, model, policy: str, alpha_0: float, alpha_tilde: float, parameterization: str = "full",
                 q_scale: float = 1.0):
        self.model = model
        self.inner = inner_model(model)
        self.cache_kw = _cache_kwarg(self.inner)
        self.policy, self.alpha_0, self.alpha_tilde = policy, alpha_0, alpha_tilde
        self.parameterization, self.q_scale = parameterization, q_scale

    def compose(self, q: torch.Tensor | None, base: torch.Tensor | None) -> torch.Tensor:
        """The policy's logits from the adapter logits ``q`` and the base logits ``base``."""
        if self.policy == "base":
            return base
        if self.policy == "adapter":
            return q
        if base is None:  # one branch suffices (_one_branch): π̃'s logits up to a per-row constant
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


class _FastEngine(_Engine):
    """One forward per token for both branches, one KV cache (see the module docstring)."""

    def __init__(self, model, policy, alpha_0, alpha_tilde, batch_size: int, parameterization="full", q_scale=1.0):
        super().__init__(model, policy, alpha_0, alpha_tilde, parameterization, q_scale)
        self.B = batch_size
        peft = is_peft(model)
        if policy == "base" or not peft:
            self.branches = ("base",)
        elif _one_branch(policy, alpha_0, parameterization, q_scale):
            self.branches = ("adapter",)
        else:
            self.branches = ("base", "adapter")
        self.two = len(self.branches) == 2
        self.cache = _new_cache(self.inner)
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
            elif self.two:  # PEFT's own mixed-adapter batch (_fast_supported refused "reference")
                self.adapter_names = ["__base__"] * self.B + [adapter] * self.B
        self.mixed_head = self._mixed_head() if self.two and policy == "customized" else None

    def _mixed_head(self):
        """π̃'s logits straight from the hidden states, with ONE vocabulary projection for both branches.

        The output embedding is linear, z = W·h + b, and eq. (1) is linear in the two branches' logits
        up to a per-row constant: (Q̂ + α0·log π1)/α̃ = (a·zθ + c·z1)/α̃ − α0·logsumexp(z1)/α̃ with
        (a, c) = (1, α0) for a full Q̂ and (q_scale, α0 − q_scale) for a residual one. So
        W·(a·hθ + c·h1)/α̃ + (a + c)·b/α̃ are π̃'s logits shifted by a per-row constant, which changes
        nothing the decoding loop does with them (softmax, argmax, temperature, top-k, top-p, the -inf
        of min_new_tokens). That projects B rows instead of 2B, and no log-softmax over the base row.
        None (compose the two branches' logits) where the head is not a plain ``nn.Linear`` without
        hooks or logit post-processing, or where a caller replaced :meth:`compose` (it wants the raw
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
        mixed = self.mixed_head if "compose" not in vars(self) else None
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
        self.cache = _new_cache(self.inner)
        for j in range(len(parts[0][0].cache.layers)):
            keys = gather(lambda e: e.cache.layers[j].keys, 2)
            values = gather(lambda e: e.cache.layers[j].values, 2)
            self.cache.update(keys, values, j)

    def close(self):
        self._stack.close()


class _ReferenceEngine(_Engine):
    """Two separate forwards per token through the public PEFT model, one KV cache per branch."""

    def __init__(self, model, policy, alpha_0, alpha_tilde, batch_size: int, parameterization="full", q_scale=1.0):
        super().__init__(model, policy, alpha_0, alpha_tilde, parameterization, q_scale)
        self.peft = is_peft(model)
        self.need_q = policy != "base"
        self.need_base = policy != "adapter"
        self.cache_q, self.cache_base = _new_cache(self.inner), _new_cache(self.inner)

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


# ----------------------------------------------------------------------------------------- the loop


def _logits_processors(prompt_len, min_new_tokens, eos, device, do_sample, temperature, top_k, top_p):
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
    inner = inner_model(model)
    device = next(inner.parameters()).device
    eos = eos_token_ids(model, tokenizer, eos_token_id)
    pad_id = pad_token_id(tokenizer, model, eos)
    rows = [encode_prompt(tokenizer, p, raw_text) for p in prompt_list]
    input_ids, attention_mask = left_pad(rows, pad_id, device)
    B, P = input_ids.shape
    if max_new_tokens == 0:
        return ([""] * B, [[] for _ in range(B)]) if return_ids else [""] * B

    processors = _logits_processors(P, min_new_tokens, eos, device, do_sample, temperature, top_k, top_p)
    stop = None
    if stop_strings:
        from transformers import StopStringCriteria
        stop = StopStringCriteria(tokenizer, [stop_strings] if isinstance(stop_strings, str) else list(stop_strings))
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))

    was_training = model.training
    model.eval()
    if engine_factory is not None:
        engine = engine_factory(B)
    else:
        Engine = (_FastEngine if fast and _fast_supported(model, policy, alpha_0, parameterization, q_scale)
                  else _ReferenceEngine)
        engine = Engine(model, policy, float(alpha_0), float(alpha_tilde), B, parameterization, float(q_scale))
    try:
        with torch.inference_mode():
            seqs = torch.empty((B, P + max_new_tokens), dtype=torch.long, device=device)
            seqs[:, :P] = input_ids
            unfinished = torch.ones(B, dtype=torch.bool, device=device)
            lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
            pad_t = torch.tensor(pad_id, dtype=torch.long, device=device)
            if streamer is not None:
                streamer.put(input_ids.cpu())

            logits = engine.prefill(input_ids, attention_mask, P + max_new_tokens)
            for step in range(max_new_tokens):
                cur = P + step
                scores = processors(seqs[:, :cur], logits) if processors else logits
                if do_sample:
                    probs = F.softmax(scores, dim=-1)
                    tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
                else:
                    tokens = scores.argmax(dim=-1)
                tokens = torch.where(unfinished, tokens, pad_t)
                seqs[:, cur] = tokens
                if streamer is not None:
                    streamer.put(tokens.cpu())
                done = torch.isin(tokens, eos_t) if eos_t is not None else torch.zeros_like(unfinished)
                if stop is not None:
                    done = done | stop(seqs[:, :cur + 1], None).to(device)
                done = done & unfinished
                lengths = torch.where(done, step + 1, lengths)
                unfinished = unfinished & ~done
                if step + 1 == max_new_tokens or not bool(unfinished.any()):
                    break
                logits = engine.step(tokens)
            if streamer is not None:
                streamer.end()
    finally:
        engine.close()
        if was_training:
            model.train()

    lengths = lengths.tolist()
    new_ids = [seqs[i, P:P + lengths[i]].tolist() for i in range(B)]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
    return (texts, new_ids) if return_ids else texts
