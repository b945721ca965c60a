"""One scorer of log π(y|x) for every policy qadapter serves: π1, softmax(zθ) and π̃ (eq. 1) at any
number of decoding settings, from ONE forward per batch.

Everything that scores text goes through :func:`score` (``QAdapter.score``, the main job's
``recipes.train.pair_log_likelihoods``, and through :mod:`qadapter.evaluation.scoring` the MMLU / ARC /
lm-eval log-likelihoods, preference accuracy and margins, and the KL from the base). It does what
the plain scorer (two passes, every position projected to the whole vocabulary) does, more cheaply:

* **both branches in one forward**: the batch holds every row twice, rows ``:R`` the base branch
  (adapter disabled, z1), rows ``R:`` the adapter branch (zθ), and every LoRA ``Linear`` applies the
  adapter to the adapter rows only (:class:`qadapter.generation.SplitRows`, as the fast decoder
  does), so the base weights are read once for both. Adapters :class:`SplitRows` does not handle
  use PEFT's mixed-adapter batch; those PEFT cannot mix (DoRA, merged) get two passes. A plain
  (non-PEFT) model, or a request for one branch only, runs one branch.
* **the prompt computed once** for all continuations that share it (the chosen and rejected
  answer of a pair, the 4 choices of a multiple-choice question): a row is
  ``[prompt | cont_1[:-1] | cont_2[:-1] | ...]``, positions restart after the prompt for each
  continuation, and a 4D block mask lets a continuation's tokens see the prompt and their own
  block only, so each token computes exactly what it computes in its own unpadded row. The last
  prompt state scores the first token of every continuation; a continuation's last token is
  never fed (nothing scores what follows it). Models whose attention takes no 4D mask (flash
  attention, a sliding window shorter than a row) get one row per continuation instead.
* **the vocabulary projected only at the scored states**: the model returns the hidden states at
  those columns only (``logits_to_keep`` with an index tensor, the output embedding replaced by
  the identity), which are gathered to the (N, H) scored states and projected in chunks. Heads
  that post-process their output (soft-capping, scaling, an adapted head) are used as they are,
  at the kept columns.
* **several compositions from the same forward**: log π1, log softmax(zθ) and log π̃ at every
  requested (α0, α̃) or residual strength are composed per chunk of scored states, which costs a
  few (chunk, V) operations per policy next to the forward.

Per request it returns the summed log-probability under each requested policy, optionally
whether greedy decoding would produce the continuation, and the summed per-token
KL(π‖π1) (or KL(π1‖π)) over the scored states. ``tests/test_scoring.py`` checks all of it against
the plain two-pass full-vocabulary scorer.

Why one module of ~440 lines: the batch layout, the one-forward plan and the per-policy readout
are one algorithm whose parts share private tensors; :mod:`qadapter.backbone` holds what is shared
with the decoder and the trainer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .backbone import (active_adapter, attention_kind, fast_plan, inner_model, is_peft, projection_head, replaced_forward,
                       SplitRows)
from .objective import composed_logits, q_values

__all__ = ["Scores", "score", "policy_specs", "KL_DIRECTIONS"]

KL_DIRECTIONS = ("policy||base", "base||policy")

#: Scored states projected to the vocabulary at a time (a few (chunk, V) float32 tensors are alive).
STATE_CHUNK = 256


@dataclass
class Scores:
    """What :func:`score` returns, one entry per request (in request order) for each policy name.

    ``logprobs[name]``: Σ_t log π(y_t | x, y_<t); ``greedy[name]``: whether argmax decoding under π
    reproduces y (only with ``greedy=True``); ``kl[name]``: Σ_t KL at the scored states (only with
    ``kl=...``); ``n_tokens``: the number of scored tokens; ``alphas[name]``: the (α0, α̃) of a
    customized policy (None for ``base`` / ``adapter``). With ``top_logprobs=k``:
    ``token_logprobs[name][i]``: log π(y_t | x, y_<t) for each token t of request i, and
    ``top_logprobs[name][i][t]``: the k most likely tokens there as ``(token id, log π)``, most
    likely first (what OpenAI's ``logprobs`` / ``top_logprobs`` report).
    """

    logprobs: dict[str, list[float]]
    n_tokens: list[int]
    greedy: dict[str, list[bool]] | None = None
    kl: dict[str, list[float]] | None = None
    alphas: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    token_logprobs: dict[str, list[list[float]]] | None = None
    top_logprobs: dict[str, list[list[list[tuple[int, float]]]]] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.logprobs)


# --------------------------------------------------------------------------------- policies


def policy_specs(settings, policies: Sequence[str] = ("customized",), strengths: Sequence[float] = (),
                 alphas: Sequence[tuple[float, float]] = ()) -> dict[str, tuple]:
    """Name → spec of every requested policy: ``("base",)``, ``("adapter",)`` or
    ``("customized", α0, α̃)``.

    ``policies`` holds ``"base"`` (π1), ``"adapter"`` (softmax(zθ)) and ``"customized"`` (π̃ at the
    saved α's of ``settings``); each residual ``strengths`` s adds ``"strength=s"`` (α0 = α̃ =
    q_scale/s, :meth:`QAdapterSettings.decoding_alphas`), each ``alphas`` pair (α0, α̃) adds
    ``"alpha_0=…,alpha_tilde=…"``.
    """
    specs: dict[str, tuple] = {}
    for name in policies:
        if name in ("base", "adapter"):
            specs[name] = (name,)
        elif name == "customized":
            specs[name] = ("customized", *_need_settings(settings).decoding_alphas())
        else:
            raise ValueError(f"unknown policy {name!r}: give 'base', 'adapter' or 'customized' "
                             "(and strengths= / alphas= for more customized ones)")
    for s in strengths:
        specs[f"strength={float(s)!r}"] = ("customized", *_need_settings(settings).decoding_alphas(strength=float(s)))
    for a0, at in alphas:
        if not at > 0:
            raise ValueError(f"alpha_tilde must be > 0, got {at}")
        specs[f"alpha_0={float(a0)!r},alpha_tilde={float(at)!r}"] = ("customized", float(a0), float(at))
    if not specs:
        raise ValueError("no policy to score: give policies, strengths or alphas")
    return specs


def _need_settings(settings):
    if settings is None:
        raise ValueError("a customized policy needs the Q-Adapter's settings (settings=QAdapterSettings)")
    return settings


# --------------------------------------------------------------------------------- the model


def _identity_head(head):
    """Within the block the head returns the hidden states it is given (None: no head, no change)."""
    return contextlib.nullcontext() if head is None else replaced_forward(head, lambda hidden: hidden)


def _plan(model, need: set[str], one_forward: bool):
    """How to compute the needed branches: (kind, extra), kind one of ``plain`` (a non-PEFT model),
    ``base`` / ``adapter`` (one branch), ``split`` / ``mixed`` (both in one forward), ``two``."""
    if not is_peft(model):
        return "plain", None
    if need == {"base"}:
        return "base", None
    if need == {"adapter"}:
        return "adapter", None
    if not one_forward:
        return "two", None

    adapter = active_adapter(model)
    plan, layers = fast_plan(model, adapter)
    if plan == "split":
        return "split", (layers, adapter)
    if plan == "peft":
        return "mixed", adapter
    return "two", None


def _run(model, plan, kwargs: dict, head) -> dict[str, torch.Tensor]:
    """The model's output at the kept columns for each branch: hidden states when ``head`` is
    given (then replaced by the identity), else logits."""
    kind, extra = plan
    with _identity_head(head):
        if kind == "plain":
            return {"base": model(**kwargs).logits}
        if kind == "base":
            with model.disable_adapter():
                return {"base": model(**kwargs).logits}
        if kind == "adapter":
            return {"adapter": model(**kwargs).logits}
        if kind == "two":
            adapter = model(**kwargs).logits
            with model.disable_adapter():
                base = model(**kwargs).logits
            return {"base": base, "adapter": adapter}
        rows = kwargs["input_ids"].shape[0]
        doubled = {k: (v.repeat(2, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) and k != "logits_to_keep" else v)
                   for k, v in kwargs.items()}
        if kind == "split":
            layers, adapter = extra
            with SplitRows(layers, rows, adapter):
                out = inner_model(model)(**doubled).logits
        else:  # PEFT's mixed-adapter batch
            out = model(**doubled, adapter_names=["__base__"] * rows + [extra] * rows).logits
        return {"base": out[:rows], "adapter": out[rows:]}


# --------------------------------------------------------------------------------- layout


@dataclass
class _Batch:
    input_ids: torch.Tensor      # (R, W)
    attention_mask: torch.Tensor  # (R, W) or (R, 1, W, W)
    position_ids: torch.Tensor   # (R, W)
    kept: torch.Tensor           # (K,) columns whose outputs are needed
    state_row: torch.Tensor      # (N,) row of each scored state
    state_col: torch.Tensor      # (N,) index into kept
    actions: torch.Tensor        # (N,) the token scored there
    owner: torch.Tensor          # (N,) the request it belongs to


def _layout(groups, pad_id: int, attention_kind: str | None, dtype, device) -> _Batch:
    """Rows ``[prompt | cont_1[:-1] | cont_2[:-1] | ...]``, right-padded; a 4D block mask when a
    row holds more than one continuation (else a 2D mask)."""
    rows = []
    for prompt, conts in groups:
        rows.append(list(prompt) + [t for _, c in conts for t in c[:-1]])
    R, W = len(rows), max(len(r) for r in rows)
    ids = torch.full((R, W), pad_id, dtype=torch.long)
    pos = torch.zeros((R, W), dtype=torch.long)
    block = torch.full((R, W), -1, dtype=torch.long)
    s_row, s_col, acts, owner = [], [], [], []
    for r, (prompt, conts) in enumerate(groups):
        p = len(prompt)
        ids[r, :len(rows[r])] = torch.as_tensor(rows[r], dtype=torch.long)
        pos[r, :p] = torch.arange(p)
        block[r, :p] = 0
        at = p
        for k, (req, cont) in enumerate(conts):
            n = len(cont) - 1
            pos[r, at:at + n] = torch.arange(p, p + n)
            block[r, at:at + n] = k + 1
            s_row += [r] * len(cont)
            s_col += [p - 1] + list(range(at, at + n))
            acts += list(cont)
            owner += [req] * len(cont)
            at += n
    if any(len(conts) > 1 for _, conts in groups):
        q, k = block[:, :, None], block[:, None, :]
        allowed = torch.ones((W, W), dtype=torch.bool).tril()[None] & (k >= 0) & ((k == 0) | (k == q))
        allowed |= torch.eye(W, dtype=torch.bool)[None]  # padding queries see themselves: no NaN
        allowed = allowed[:, None]
        if attention_kind == "eager":
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        else:
            mask = allowed
    else:
        mask = (block >= 0).long()
    s_col_t = torch.as_tensor(s_col, dtype=torch.long)
    kept = torch.unique(s_col_t)
    return _Batch(ids.to(device), mask.to(device), pos.to(device), kept.to(device),
                  torch.as_tensor(s_row, dtype=torch.long, device=device),
                  torch.searchsorted(kept, s_col_t).to(device), torch.as_tensor(acts, dtype=torch.long, device=device),
                  torch.as_tensor(owner, dtype=torch.long, device=device))


def _prepare(requests, max_length: int | None, share_prompt: bool, allow_empty: bool = False):
    """Groups (context, [(request index, continuation)]) in the order they are scored."""
    groups: dict[Any, tuple[tuple[int, ...], list]] = {}
    for i, (context, continuation) in enumerate(requests):
        cont = [int(t) for t in continuation]
        if not cont:
            if allow_empty:
                continue  # nothing to score: log-probability 0
            raise ValueError("a continuation must have at least one token")
        ctx = [int(t) for t in context]
        if max_length is not None:
            if len(cont) > max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={max_length}")
            ctx = ctx[max(0, len(ctx) + len(cont) - (max_length + 1)):]
        if not ctx:
            raise ValueError("empty context: give at least one context token (e.g. BOS) before the continuation")
        key = tuple(ctx) if share_prompt else i
        groups.setdefault(key, (tuple(ctx), []))[1].append((i, cont))
    out = list(groups.values())
    out.sort(key=lambda g: -(len(g[0]) + sum(len(c) - 1 for _, c in g[1])))
    return out


def _batches(groups, batch_size: int, batch_tokens: int):
    """Consecutive groups (longest first), at most ``batch_size`` rows and rows × width tokens."""
    batch, width = [], 0
    for g in groups:
        size = len(g[0]) + sum(len(c) - 1 for _, c in g[1])
        if batch and (len(batch) + 1 > batch_size or (len(batch) + 1) * max(width, size) > batch_tokens):
            yield batch
            batch, width = [], 0
        batch.append(g)
        width = max(width, size)
    if batch:
        yield batch


# --------------------------------------------------------------------------------- the scorer


def _states(model, plan, batch: _Batch, head) -> dict[str, torch.Tensor]:
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False, logits_to_keep=batch.kept)
    out = _run(model, plan, kwargs, head)
    return {name: t[batch.state_row, batch.state_col] for name, t in out.items()}  # (N, H or V)


def _project(states: torch.Tensor, head) -> torch.Tensor:
    if head is None:
        return states.float()
    return F.linear(states.to(head.weight.dtype), head.weight, head.bias).float()


@torch.no_grad()
def score(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, settings=None,
          policies: Sequence[str] = ("customized",), strengths: Sequence[float] = (),
          alphas: Sequence[tuple[float, float]] = (), greedy: bool = False, kl: str | None = None,
          reference: tuple[Any, str] | None = None, pad_token_id: int = 0, max_length: int | None = None,
          batch_size: int = 8, batch_tokens: int = 8192, share_prompt: bool = True, one_forward: bool = True,
          allow_empty: bool = False, progress: bool = False, desc: str = "scoring",
          top_logprobs: int | None = None) -> Scores:
    """log π(continuation | context) for each ``(context_ids, continuation_ids)`` request, summed
    over the continuation's tokens, under every requested policy, from one forward per batch.

    Args:
        model: a ``peft.PeftModel`` (π1 = adapter disabled, zθ = adapter on) or a plain causal LM
            (one branch: ``base`` and ``adapter`` both name the model itself).
        settings: the :class:`~qadapter.modeling.QAdapterSettings` that define Q̂ and the saved
            α's; needed for customized policies.
        policies, strengths, alphas: which policies (see :func:`policy_specs`); e.g.
            ``policies=("base",), strengths=[0.25, 0.5, 1, 2, 4]``.
        greedy: also report whether greedy decoding reproduces each continuation.
        kl: ``"policy||base"`` or ``"base||policy"``: also Σ_t KL(π‖π1) (resp. KL(π1‖π)) over the
            scored states for each policy, π1 the model's own base branch or ``reference``.
        reference: ``(other_model, branch)`` whose ``branch`` (``"base"`` / ``"adapter"``) is π1
            for ``kl`` (e.g. a separately loaded base model); run on the same batches.
        max_length: inputs longer than this lose tokens on the left of the context.
        batch_size, batch_tokens: at most this many rows (each one prompt with all its
            continuations; one request per row without sharing), and rows × width tokens, per
            branch in one forward (a row alone may exceed ``batch_tokens``).
        share_prompt, one_forward: the two savings; off, the scorer runs one row per request and
            two passes (same numbers, for comparisons).
        allow_empty: an empty continuation scores 0 (an empty product) instead of raising.
        top_logprobs: also each token's log-probability and the ``top_logprobs`` most likely
            tokens at each scored state (0: the tokens' log-probabilities only), per policy.
    Returns:
        :class:`Scores`.
    """
    specs = policy_specs(settings, policies, strengths, alphas)
    if kl is not None and kl not in KL_DIRECTIONS:
        raise ValueError(f"kl must be one of {KL_DIRECTIONS} or None, got {kl!r}")
    if top_logprobs is not None and top_logprobs < 0:
        raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
    models, plans, heads = _models(model, specs, kl, reference, one_forward)
    requests = list(requests)
    groups = _prepare(requests, max_length, share_prompt, allow_empty)
    longest = max((len(g[0]) + sum(len(c) - 1 for _, c in g[1]) for g in groups), default=0)
    kinds = [attention_kind(m, longest) for m in models]
    if share_prompt and any(k is None for k in kinds) and any(len(g[1]) > 1 for g in groups):
        groups = _prepare(requests, max_length, False, allow_empty)  # no 4D masks: one row per request
    kind = "eager" if "eager" in kinds else "sdpa"
    device = next(model.parameters()).device
    dtype = next(inner_model(model).parameters()).dtype

    n = len(requests)
    tally = _Tally(specs, n, greedy, kl, top_logprobs)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=desc, leave=False)
    try:
        for groups_b in _batches(groups, batch_size, batch_tokens):
            batch = _layout(groups_b, pad_token_id, kind, dtype, device)
            states = _states(model, plans[0], batch, heads[0])
            ref_states = None
            if reference is not None:
                ref_model, ref_branch = reference
                ref_out = _states(ref_model, plans[1], _moved(batch, ref_model), heads[1])
                ref_states = ref_out[ref_branch if is_peft(ref_model) else "base"]
            owner = batch.owner.cpu()
            tally.n_tokens.index_add_(0, owner, torch.ones_like(owner))
            for start in range(0, batch.actions.shape[0], STATE_CHUNK):
                rows = slice(start, start + STATE_CHUNK)
                z = {b: _project(t[rows], heads[0]) for b, t in states.items()}
                ref_lp = None
                if ref_states is not None:
                    ref_lp = F.log_softmax(_project(ref_states[rows], heads[1]).to(batch.actions.device), dim=-1)
                    if ref_lp.shape[-1] != z["base" if "base" in z else "adapter"].shape[-1]:
                        raise ValueError(f"vocabulary sizes differ ({ref_lp.shape[-1]} vs the model's): "
                                         "the reference must share the tokenizer")
                for name, lp, log_pi1 in _policies(model, specs, z, settings):
                    tally.add(name, owner[rows], batch.actions[rows], lp, ref_lp if ref_lp is not None else log_pi1)
                    del lp
                del z, ref_lp
            if bar is not None:
                bar.update(sum(len(g[1]) for g in groups_b))
        if bar is not None:
            bar.update(n - bar.n)  # the empty continuations
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
        if bar is not None:
            bar.close()
    return tally.scores(specs)


def _models(model, specs, kl, reference, one_forward):
    """([model, reference model?], their plans, their projection heads), checking the combination."""
    customized = any(s[0] == "customized" for s in specs.values())
    if customized and not is_peft(model):
        raise ValueError("a customized policy needs a PEFT model (the adapter on and off)")
    need: set[str] = set()
    for spec in specs.values():
        need |= {"base", "adapter"} if spec[0] == "customized" else {spec[0]}
    if kl is not None and reference is None:
        need.add("base")
    if not is_peft(model):
        need = {"base"}  # one branch: the model itself
    models, plans, heads = [model], [_plan(model, need, one_forward)], [projection_head(model)]
    if reference is not None:
        ref_model, ref_branch = reference
        if ref_branch not in ("base", "adapter"):
            raise ValueError(f"reference branch must be 'base' or 'adapter', got {ref_branch!r}")
        plans.append(_plan(ref_model, {ref_branch} if is_peft(ref_model) else {"base"}, one_forward))
        heads.append(projection_head(ref_model))
        models.append(ref_model)
    return models, plans, heads


def _policies(model, specs, z, settings):
    """(name, log π over the vocabulary, log π1) of every policy at a chunk of scored states."""
    log_pi1 = F.log_softmax(z["base"], dim=-1) if "base" in z else None
    q = None
    for name, spec in specs.items():
        if spec[0] == "base":
            lp = log_pi1
        elif spec[0] == "adapter":
            lp = F.log_softmax(z["adapter"], dim=-1) if is_peft(model) else log_pi1
        else:
            if q is None:
                q = q_values(z["adapter"], z["base"], settings.parameterization, settings.q_scale)
            lp = F.log_softmax(composed_logits(q, log_pi1, spec[1], spec[2]), dim=-1)
        yield name, lp, log_pi1


class _Tally:
    """What :func:`score` sums per request (and, with ``top``, keeps per token) as chunks are read."""

    def __init__(self, specs, n: int, greedy: bool, kl: str | None, top: int | None):
        self.kl, self.top = kl, top
        self.sums = {name: torch.zeros(n, dtype=torch.float64) for name in specs}
        self.misses = {name: torch.zeros(n, dtype=torch.long) for name in specs} if greedy else None
        self.kls = {name: torch.zeros(n, dtype=torch.float64) for name in specs} if kl is not None else None
        self.n_tokens = torch.zeros(n, dtype=torch.long)
        # per chunk (owner, token log-prob, top ids, top log-probs); in order, a request's tokens in order
        self.parts: dict[str, list] | None = {name: [] for name in specs} if top is not None else None

    def add(self, name, who, actions, lp, other) -> None:
        chosen = lp.gather(-1, actions[:, None]).squeeze(-1)
        self.sums[name].index_add_(0, who, chosen.double().cpu())
        if self.misses is not None:
            self.misses[name].index_add_(0, who, (lp.argmax(-1) != actions).long().cpu())
        if self.kls is not None:
            a, b = (lp, other) if self.kl == "policy||base" else (other, lp)
            self.kls[name].index_add_(0, who, (a.exp() * (a - b)).sum(-1).clamp_min(0.0).double().cpu())
        if self.parts is not None:
            values, ids = lp.topk(self.top, dim=-1) if self.top else (lp[:, :0], actions[:, None][:, :0])
            self.parts[name].append((who, chosen.cpu(), ids.cpu(), values.cpu()))

    def scores(self, specs) -> Scores:
        tokens = tops = None
        if self.parts is not None:
            tokens, tops = {}, {}
            for name, parts in self.parts.items():
                tokens[name], tops[name] = [[] for _ in range(len(self.n_tokens))], [[] for _ in self.n_tokens]
                for who, chosen, ids, values in parts:
                    for w, c, i, v in zip(who.tolist(), chosen.tolist(), ids.tolist(), values.tolist()):
                        tokens[name][w].append(c)
                        tops[name][w].append(list(zip(i, v)))
        return Scores(logprobs={k: v.tolist() for k, v in self.sums.items()}, n_tokens=self.n_tokens.tolist(),
                      greedy={k: (v == 0).tolist() for k, v in self.misses.items()} if self.misses is not None else None,
                      kl={k: v.tolist() for k, v in self.kls.items()} if self.kls is not None else None,
                      alphas={k: (s[1], s[2]) if s[0] == "customized" else None for k, s in specs.items()},
                      token_logprobs=tokens, top_logprobs=tops)


def _moved(batch: _Batch, other_model) -> _Batch:
    """The batch on ``other_model``'s device (an additive 4D mask in its dtype)."""
    device = next(other_model.parameters()).device
    moved = _Batch(**{k: v.to(device) for k, v in batch.__dict__.items()})
    mask = batch.attention_mask
    if mask.dim() == 4 and mask.dtype != torch.bool:
        dtype = next(inner_model(other_model).parameters()).dtype
        moved.attention_mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(
            mask.to(device) < 0, torch.finfo(dtype).min)
    return moved
