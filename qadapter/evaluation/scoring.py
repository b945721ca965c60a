"""The two primitives every evaluator is built on: scoring continuations and generating answers.

Scoring goes through the one scorer :func:`qadapter.scoring.score` for every policy it knows (the
base model, an SFT or DPO model, a Q-Adapter and their base views: :func:`scorer_source`), so all
of them are scored by exactly the same code; any other
:class:`~qadapter.evaluation.policy.Policy` through its ``logits``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..generation import left_pad
from ..scoring import score
from .policy import HFPolicy, QAdapterBaseView, call_logits, cut_at_stop, pad_token_id

__all__ = ["continuation_logprobs", "policies_logprobs", "scorer_source", "generate_texts"]


def scorer_source(policy) -> tuple[Any, Any, str] | None:
    """(model, settings, policy name) by which :func:`qadapter.scoring.score` scores ``policy``, or
    None for a policy it does not know (scored through its ``logits`` instead).

    A :class:`~qadapter.modeling.QAdapter` is π̃ (``customized``) of its PEFT model, its
    :class:`QAdapterBaseView` and an adapter-disabled :class:`HFPolicy` are ``base``, an
    :class:`HFPolicy` over a PEFT model is ``adapter``, over a plain model the model itself.
    """
    from ..modeling import QAdapter

    if isinstance(policy, QAdapter) and type(policy).logits is QAdapter.logits:
        return policy.model, policy.settings, "customized"
    if type(policy) is QAdapterBaseView:
        return policy.qadapter.model, policy.qadapter.settings, "base"
    if type(policy) is HFPolicy:
        if policy.disable_adapter or not hasattr(policy.model, "disable_adapter"):
            return policy.model, None, "base"
        return policy.model, None, "adapter"
    return None


def _shared(sources) -> tuple[Any, Any] | None:
    """(model, settings) when every source is a branch of the same model with compatible settings."""
    if any(s is None for s in sources) or len({id(s[0]) for s in sources}) != 1:
        return None
    settings = [s[1] for s in sources if s[1] is not None]
    if any(other != settings[0] for other in settings[1:]):
        return None
    return sources[0][0], (settings[0] if settings else None)


def _prepare_requests(requests, max_length):
    """Validated ``(context, continuation)`` lists, the context cut on the left to ``max_length``."""
    out = []
    for context, continuation in requests:
        continuation = list(continuation)
        if not continuation:
            raise ValueError("a continuation must have at least one token")
        context = list(context)
        if max_length is not None:
            if len(continuation) > max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length={max_length}")
            context = context[max(0, len(context) + len(continuation) - (max_length + 1)):]
        if not context:
            raise ValueError("empty context: give at least one context token (e.g. BOS) before the continuation")
        out.append((context, continuation))
    return out


@torch.no_grad()
def policies_logprobs(policies: Sequence[Any], requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                      batch_size: int = 8, max_length: int | None = None, progress: bool = True,
                      desc: str = "scoring") -> list[list[tuple[float, bool]]]:
    """:func:`continuation_logprobs` for several policies at once: those that are branches of one
    model (a Q-Adapter and its base view, a PEFT policy and its adapter-disabled view) are scored
    from the same forwards; the others one after another. One list per policy."""
    requests = _prepare_requests(requests, max_length)
    sources = [scorer_source(p) for p in policies]
    shared = _shared(sources) if len(policies) > 1 else None
    if shared is not None:
        model, settings = shared
        names = list(dict.fromkeys(s[2] for s in sources))
        scores = score(model, requests, settings=settings, policies=names, greedy=True,
                       pad_token_id=pad_token_id(policies[0].tokenizer), batch_size=batch_size,
                       progress=progress, desc=desc)
        return [list(zip(scores.logprobs[s[2]], scores.greedy[s[2]])) for s in sources]
    return [_one_policy(p, src, requests, batch_size, progress, desc) for p, src in zip(policies, sources)]


def _one_policy(policy, source, requests, batch_size, progress, desc):
    if source is None:
        return _logits_continuation_logprobs(policy, requests, batch_size=batch_size, progress=progress, desc=desc)
    model, settings, name = source
    scores = score(model, requests, settings=settings, policies=(name,), greedy=True,
                   pad_token_id=pad_token_id(policy.tokenizer), batch_size=batch_size, progress=progress, desc=desc)
    return list(zip(scores.logprobs[name], scores.greedy[name]))


@torch.no_grad()
def continuation_logprobs(policy, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 8,
                          max_length: int | None = None, progress: bool = True,
                          desc: str = "scoring") -> list[tuple[float, bool]]:
    """log π(continuation | context) summed over the continuation's tokens, and whether greedy
    decoding would produce exactly that continuation, for each ``(context_ids, continuation_ids)``.

    Inputs longer than ``max_length`` tokens lose tokens on the left of the context. Known
    policies (:func:`scorer_source`) are scored by :func:`qadapter.scoring.score`: both branches
    of a Q-Adapter in one forward, requests with the same context (e.g. the four answers " A" ..
    " D" of an MMLU question) sharing its computation, the vocabulary projected only where a
    continuation token is scored, ``batch_size`` contexts per forward. Any other policy goes
    through its ``logits`` (left-padded batches; requests that feed the same tokens share a pass).
    """
    return policies_logprobs([policy], requests, batch_size=batch_size, max_length=max_length,
                             progress=progress, desc=desc)[0]


def _logits_continuation_logprobs(policy, requests, *, batch_size: int = 8, progress: bool = True,
                                  desc: str = "scoring") -> list[tuple[float, bool]]:
    """The scorer for policies known only by their ``logits``: one row per distinct fed input."""
    unique: dict[tuple[int, ...], int] = {}
    inputs: list[tuple[int, ...]] = []
    need: list[int] = []  # the number of trailing positions each unique input must be scored at
    plan: list[tuple[int, list[int]]] = []
    for context, continuation in requests:
        fed = tuple(list(context) + continuation[:-1])
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

    A ``str`` prompt is raw text (``raw_text=True``: no chat template, :func:`qadapter.chat.raw_text_ids`); a
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
