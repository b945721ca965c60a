"""The two primitives every evaluator is built on: scoring continuations and generating answers.

Both only call the :class:`~qadapter.evaluation.policy.Policy` interface, so the base model, an SFT or
DPO model and a Q-Adapter are scored by exactly the same code.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..generation import left_pad
from .policy import call_logits, cut_at_stop, pad_token_id

__all__ = ["continuation_logprobs", "generate_texts"]


@torch.no_grad()
def continuation_logprobs(policy, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 8,
                          max_length: int | None = None, progress: bool = True,
                          desc: str = "scoring") -> list[tuple[float, bool]]:
    """log π(continuation | context) summed over the continuation's tokens, and whether greedy
    decoding would produce exactly that continuation, for each ``(context_ids, continuation_ids)``.

    Requests that feed the model the same tokens (e.g. the four one-token answers " A" .. " D" of an
    MMLU question) share one forward pass. Inputs longer than ``max_length`` tokens lose tokens on
    the left of the context. Batches are left-padded and sorted by length.
    """
    unique: dict[tuple[int, ...], int] = {}
    inputs: list[tuple[int, ...]] = []
    need: list[int] = []  # the number of trailing positions each unique input must be scored at
    plan: list[tuple[int, list[int]]] = []
    for context, continuation in requests:
        continuation = list(continuation)
        if not continuation:
            raise ValueError("a continuation must have at least one token")
        seq = list(context) + continuation
        if max_length is not None:
            if len(continuation) > max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length={max_length}")
            seq = seq[-(max_length + 1):]
        fed = tuple(seq[:-1])
        if len(fed) < len(continuation):
            raise ValueError("empty context: give at least one context token (e.g. BOS) before the continuation")
        idx = unique.setdefault(fed, len(inputs))
        if idx == len(inputs):
            inputs.append(fed)
            need.append(0)
        need[idx] = max(need[idx], len(continuation))
        plan.append((idx, continuation))

    # per unique input: log-probs of the requested tokens, keyed by request
    by_input: dict[int, list[int]] = {}
    for r, (idx, _) in enumerate(plan):
        by_input.setdefault(idx, []).append(r)
    results: list[tuple[float, bool] | None] = [None] * len(plan)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    pad = pad_token_id(policy.tokenizer)
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids, mask = left_pad([inputs[i] for i in batch], pad, policy.device)
        keep = max(need[i] for i in batch)
        logp = torch.log_softmax(call_logits(policy, ids, mask, keep_last=keep), dim=-1)  # (B, keep, V)
        for row, i in enumerate(batch):
            for r in by_input[i]:
                cont = plan[r][1]
                lp = logp[row, keep - len(cont):]  # the last len(cont) positions predict the continuation
                target = torch.as_tensor(cont, device=lp.device)
                total = lp.gather(-1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all().item())
                results[r] = (float(total), greedy)
            bar.update(len(by_input[i]))
    bar.close()
    return results  # type: ignore[return-value]


def generate_texts(policy, prompts: Sequence[Any], *, max_new_tokens: int = 256, stop_strings: Sequence[str] | None = None,
                   batch_size: int = 8, progress: bool = True, desc: str = "generating", **kwargs) -> list[str]:
    """``policy.generate`` over ``prompts`` in batches of similar length (greedy unless
    ``do_sample=True`` is passed), each answer cut before its first stop string; order preserved.

    A ``str`` prompt is raw text (``raw_text=True``: no chat template, no special tokens added); a
    message list is rendered with the chat template and the generation prompt."""
    prompts = list(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(str(prompts[i])))
    out: list[str | None] = [None] * len(prompts)
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("raw_text", True)
    stops = list(stop_strings) if stop_strings else None
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        texts = policy.generate([prompts[i] for i in batch], max_new_tokens=max_new_tokens, stop_strings=stops, **kwargs)
        if len(texts) != len(batch):
            raise RuntimeError(f"{policy!r}.generate returned {len(texts)} texts for {len(batch)} prompts")
        for i, text in zip(batch, texts):
            out[i] = cut_at_stop(text, stops)
        bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]
