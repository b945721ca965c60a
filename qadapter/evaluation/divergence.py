"""How far a policy has moved from the base model: token-level KL on general prompts.

Definition used (see docs/evaluation.md): for each general prompt x, the base model π1 answers
greedily (y = its answer, computed once and shared by every policy compared). On the fixed text
x + y, at every state s_t before a response token (the end of the prompt, then each response prefix),

    KL_t = KL(π(·|s_t) || π1(·|s_t)) = Σ_v π(v|s_t) (log π(v|s_t) − log π1(v|s_t))

over the full vocabulary. A prompt's score is the mean of KL_t over its response positions; the
reported ``kl`` is the mean over prompts (each prompt weighs the same) with a bootstrap interval over
prompts. ``direction="base||policy"`` gives KL(π1 || π) instead. Identical policies give exactly 0.
KL(π || π1) is the divergence KL-regularized fine-tuning (RLHF, DPO) penalizes; measuring it on the
base model's own answers keeps the token positions identical for every policy compared.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .benchmarks import load_general_prompts
from ..chat import as_messages, encode_prompt
from ..generation import left_pad
from .policy import call_logits, encode, pad_token_id
from ..scoring import score
from .scoring import _shared, generate_texts, scorer_source
from .stats import EvalResult, make_metric, subsample

__all__ = ["kl_from_base", "token_kl"]

DIRECTIONS = ("policy||base", "base||policy")
#: how many general prompts are drawn when no prompts are given and no limit is set
DEFAULT_KL_PROMPTS = 200


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) over the last dimension, in float32: (..., V) → (...)."""
    lp = torch.log_softmax(logits_p.float(), dim=-1)
    lq = torch.log_softmax(logits_q.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


@torch.no_grad()
def kl_from_base(policy, base, *, prompts: Sequence[Any] | None = None, responses: Sequence[str] | None = None,
                 direction: str = "policy||base", limit: int | None = None, seed: int = 0, max_new_tokens: int = 128,
                 batch_size: int = 4, data_dir=None, progress: bool = True, n_boot: int = 1000) -> EvalResult:
    """Mean token-level KL divergence between ``policy`` and ``base`` on the base model's greedy
    answers to general prompts (the module docstring has the definition).

    ``prompts``: user prompts (``str``, a user turn) or message lists, all used unless ``limit`` is
    given; default: ``limit`` (200 if None) prompts drawn (seeded) from the shipped UltraFeedback
    prompts — use prompts none of the compared methods trained on. ``responses``: fixed answer texts
    (one per prompt) to skip generation; pass ``prompts=result.extra["prompts"],
    responses=result.extra["responses"]`` of an earlier call to compare several policies on identical text.
    The two policies must share a tokenizer (a Q-Adapter and its base always do).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if prompts is None:
        prompts = subsample(load_general_prompts(data_dir), DEFAULT_KL_PROMPTS if limit is None else limit, seed)
    elif limit is not None:
        if responses is not None:
            raise ValueError("limit subsamples the prompts: give it without responses (or pass matching subsets)")
        prompts = subsample(prompts, limit, seed)
    prompts = [as_messages(p) for p in prompts]
    if responses is None:
        responses = generate_texts(base, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   progress=progress, desc="base answers")
    if len(responses) != len(prompts):
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts")
    tok = base.tokenizer
    rows = []  # (index, prompt ids, response ids)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        resp = encode(tok, response)
        if resp:
            rows.append((i, encode_prompt(tok, prompt), resp))
    sums = _kl_sums(policy, base, rows, direction, batch_size, progress)
    per_prompt = {i: s / len(resp) for (i, _, resp), s in zip(rows, sums)}
    total, n_tokens = float(sum(sums)), sum(len(r[2]) for r in rows)
    order = sorted(per_prompt)
    values = [per_prompt[i] for i in order]
    result = EvalResult("kl_from_base", len(values), {"kl": make_metric(values, n_boot, seed)}, "kl",
                        {"direction": direction, "limit": limit, "seed": seed, "max_new_tokens": max_new_tokens,
                         "n_prompts": len(prompts)},
                        samples=[{"index": i, "kl": per_prompt[i]} for i in order])
    result.extra.update(kl_token_mean=total / n_tokens if n_tokens else float("nan"), n_tokens=n_tokens,
                        skipped_empty=len(prompts) - len(values), prompts=prompts, responses=list(responses),
                        kl_max_prompt=float(np.max(values)) if values else float("nan"))
    return result


def _kl_sums(policy, base, rows, direction: str, batch_size: int, progress: bool) -> list[float]:
    """Σ_t KL at the states before each response token, per (index, prompt ids, response ids) row.

    By :func:`qadapter.scoring.score` when both policies are known to it and ``base`` is a branch
    (a base view, a plain or PEFT model): from the policy's own forward when ``base`` is its own
    base branch (one forward for π̃ and π1), else with ``base``'s model run on the same batches.
    Other policies go through their ``logits``.
    """
    if not rows:
        return []
    src_p, src_b = scorer_source(policy), scorer_source(base)
    if src_p is not None and src_b is not None and not (base is policy and src_p[2] != "base"):
        requests = [(prompt, resp) for _, prompt, resp in rows]
        model, settings, name = src_p
        shared = _shared([src_p, src_b])
        reference = None if shared is not None and src_b[2] == "base" else (src_b[0], src_b[2])
        if shared is not None and reference is None:
            settings = shared[1]
        scores = score(model, requests, settings=settings, policies=(name,), kl=direction, reference=reference,
                       pad_token_id=pad_token_id(policy.tokenizer), batch_size=batch_size, progress=progress, desc="KL")
        return scores.kl[name]
    return _logits_kl_sums(policy, base, rows, direction, batch_size, progress)


def _logits_kl_sums(policy, base, rows, direction: str, batch_size: int, progress: bool) -> list[float]:
    """:func:`_kl_sums` through the policies' ``logits``: left-padded rows, the last positions."""
    fed = sorted(range(len(rows)), key=lambda r: -(len(rows[r][1]) + len(rows[r][2])))
    sums = [0.0] * len(rows)
    pad = pad_token_id(base.tokenizer)
    bar = tqdm(total=len(rows), desc="KL", disable=not progress, leave=False)
    for start in range(0, len(fed), batch_size):
        batch = fed[start:start + batch_size]
        ids, mask = left_pad([rows[r][1] + rows[r][2][:-1] for r in batch], pad, policy.device)
        keep = max(len(rows[r][2]) for r in batch)
        lp = call_logits(policy, ids, mask, keep_last=keep)
        lq = call_logits(base, ids.to(base.device), mask.to(base.device), keep_last=keep).to(lp.device)
        if lp.shape[-1] != lq.shape[-1]:
            raise ValueError(f"vocabulary sizes differ ({lp.shape[-1]} vs {lq.shape[-1]}): the policies must share a tokenizer")
        kl = token_kl(lp, lq) if direction == "policy||base" else token_kl(lq, lp)  # (B, keep)
        for row, r in enumerate(batch):
            sums[r] = float(kl[row, keep - len(rows[r][2]):].sum())
        bar.update(len(batch))
    bar.close()
    return sums
