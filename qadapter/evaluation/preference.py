"""The preference side of the trade-off: held-out preference accuracy / margins, and judged win rates."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .benchmarks import load_general_prompts
from .judges import judge_many
from .repetition import repeated_ngram_fractions
from ..chat import as_messages, render_chat
from .policy import encode
from .scoring import generate_texts, policies_logprobs
from .stats import EvalResult, make_metric, subsample, ties_half

__all__ = ["evaluate_preferences", "win_rate", "split_pair", "encode_prompt_response"]


def split_pair(row: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen answer, rejected answer) of a pair in TRL's conversational format
    (``chosen`` / ``rejected`` message lists sharing all but the last message) or its standard format
    (``prompt``, ``chosen``, ``rejected``; the prompt a string or messages, the answers strings)."""
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        prompt = row["prompt"]
        prompt = as_messages(prompt)
        def last(x):
            return x if isinstance(x, str) else x[-1]["content"]
        return prompt, last(chosen), last(rejected)
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("chosen and rejected must share every message but the last")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("chosen and rejected must end with an assistant message")
    return list(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]


def encode_prompt_response(tokenizer, prompt: Sequence[dict[str, str]], response: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated prompt (with the generation prompt) and of the response that
    follows it in the templated conversation (end-of-turn tokens included)."""
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    full_text = render_chat(tokenizer, list(prompt) + [{"role": "assistant", "content": response}],
                            add_generation_prompt=False)
    prompt_ids, full_ids = encode(tokenizer, prompt_text), encode(tokenizer, full_text)
    if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids):]
    if full_text.startswith(prompt_text):
        return prompt_ids, encode(tokenizer, full_text[len(prompt_text):])
    raise ValueError("the chat template does not render the conversation as prompt + response")


def evaluate_preferences(policy, base, pairs: Sequence[dict[str, Any]], *, limit: int | None = None, seed: int = 0,
                         batch_size: int = 8, max_length: int | None = None, progress: bool = True,
                         n_boot: int = 1000, task: str = "preferences",
                         base_logprobs: Mapping[int, tuple[float, float]] | None = None) -> EvalResult:
    """Held-out preference accuracy of ``policy``, computed identically for every policy.

    For each pair (x, y_w, y_l), with π the policy and π1 the base model:

    * ``likelihood_accuracy``: log π(y_w|x) > log π(y_l|x);
    * ``margin`` = [log π(y_w|x) − log π1(y_w|x)] − [log π(y_l|x) − log π1(y_l|x)] (the implicit-reward
      margin of DPO with β = 1), ``margin_accuracy``: margin > 0, ``mean_margin``;
    * ``base_likelihood_accuracy``: log π1(y_w|x) > log π1(y_l|x) (the same for every policy).

    ``base_logprobs``: π1's (log π1(y_w|x), log π1(y_l|x)) by pair index (the index into ``pairs``),
    from an earlier call on the same pairs, e.g. the ``samples`` of the base model's own result:
    then only ``policy`` is scored (one branch instead of two for a policy that needs one; every
    policy of a comparison shares the base's numbers). Pairs it lacks are scored under ``base``.

    Ties count half (so the base model itself gets margin_accuracy 0.5 and mean_margin 0). Responses
    are scored as the assistant turn of the chat template (end-of-turn tokens included), by
    :func:`~qadapter.evaluation.scoring.policies_logprobs`: each prompt computed once for both
    answers, and for a policy whose ``base`` is its own base view, both from the same forwards.
    """
    rows = subsample(list(enumerate(pairs)), limit, seed)
    tok = policy.tokenizer
    requests = []
    for _, row in rows:
        prompt, chosen, rejected = split_pair(row)
        requests.append(encode_prompt_response(tok, prompt, chosen))
        requests.append(encode_prompt_response(tok, prompt, rejected))
    known = base_logprobs is not None and all(i in base_logprobs for i, _ in rows)
    # one scorer for both; a policy and its own base (a Q-Adapter and π1) share every forward
    scored = policies_logprobs([policy] if base is policy or known else [policy, base], requests,
                               batch_size=batch_size, max_length=max_length, progress=progress, desc=task)
    lp = np.asarray([s for s, _ in scored[0]]).reshape(-1, 2)
    if known:
        lb = np.asarray([base_logprobs[i] for i, _ in rows], dtype=float).reshape(-1, 2)
    else:
        lb = lp if base is policy else np.asarray([s for s, _ in scored[1]]).reshape(-1, 2)
    margin = (lp[:, 0] - lb[:, 0]) - (lp[:, 1] - lb[:, 1])
    likelihood = ties_half(lp[:, 0] - lp[:, 1])
    margin_acc = ties_half(margin)
    base_likelihood = ties_half(lb[:, 0] - lb[:, 1])
    metrics = {"margin_accuracy": make_metric(margin_acc, n_boot, seed),
               "likelihood_accuracy": make_metric(likelihood, n_boot, seed),
               "mean_margin": make_metric(margin, n_boot, seed),
               "base_likelihood_accuracy": make_metric(base_likelihood, n_boot, seed)}
    samples = [{"index": i, "logp_chosen": float(a[0]), "logp_rejected": float(a[1]), "base_logp_chosen": float(b[0]),
                "base_logp_rejected": float(b[1]), "margin": float(m)} for (i, _), a, b, m in zip(rows, lp, lb, margin)]
    return EvalResult(task, len(rows), metrics, "margin_accuracy", {"limit": limit, "seed": seed}, samples=samples)


#: how many general prompts are drawn when no prompts are given and no limit is set
DEFAULT_WIN_RATE_PROMPTS = 100


def win_rate(policy, base, judge, *, prompts: Sequence[Any] | None = None, limit: int | None = None, seed: int = 0,
             max_new_tokens: int = 256, batch_size: int = 8, policy_answers: Sequence[str] | None = None,
             base_answers: Sequence[str] | None = None, both_orders: bool = False, data_dir=None,
             progress: bool = True, n_boot: int = 1000, task: str = "win_rate") -> EvalResult:
    """Win rate of ``policy``'s answers against ``base``'s answers, scored by ``judge``.

    Both answer every prompt greedily through the chat template (``prompts``: ``str`` user turns or
    message lists, all used unless ``limit`` is given; default: ``limit`` (100 if None) general
    prompts drawn with ``seed``). Each prompt scores ``judge(prompt, policy
    answer, base answer)`` — 1 a win, 0 a loss, 0.5 a tie (a soft judge may return anything
    between); ``win_rate`` is the mean. ``repeated_4grams`` is the mean over the policy's answers of
    the fraction of each answer's word 4-grams it already said (0 = never repeats a phrase; the
    degeneration a reward-model judge may not punish). ``both_orders=True`` also asks with the answers swapped and
    averages p and 1 − p', cancelling a judge's position bias (worth it for LLM judges, useless for a
    reward model). Pre-computed answers can be passed (``policy_answers`` / ``base_answers``, e.g. the
    base answers from ``result.extra`` of an earlier call) and are then not regenerated.
    """
    if prompts is None:
        prompts = subsample(load_general_prompts(data_dir), DEFAULT_WIN_RATE_PROMPTS if limit is None else limit, seed)
    elif limit is not None:
        if policy_answers is not None or base_answers is not None:
            raise ValueError("limit subsamples the prompts: give it without pre-computed answers")
        prompts = subsample(prompts, limit, seed)
    prompts = [as_messages(p) for p in prompts]
    if policy_answers is None:
        policy_answers = generate_texts(policy, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        progress=progress, desc=f"{task}: policy answers")
    if base_answers is None:
        base_answers = generate_texts(base, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      progress=progress, desc=f"{task}: base answers")
    if not len(prompts) == len(policy_answers) == len(base_answers):
        raise ValueError("prompts, policy_answers and base_answers must have the same length")
    p = np.asarray(judge_many(judge, prompts, policy_answers, base_answers))
    if both_orders:
        p = (p + (1.0 - np.asarray(judge_many(judge, prompts, base_answers, policy_answers)))) / 2.0
    # how much the policy's answers repeat themselves (degeneration the judge may not punish)
    repetition = repeated_ngram_fractions(policy_answers, n=4)
    metrics = {"win_rate": make_metric(p, n_boot, seed), "repeated_4grams": make_metric(repetition, n_boot, seed)}
    result = EvalResult(task, len(prompts), metrics, "win_rate",
                        {"limit": limit, "seed": seed, "max_new_tokens": max_new_tokens, "both_orders": both_orders,
                         "judge": repr(judge)},
                        samples=[{"p": float(x), "repeated_4grams": r} for x, r in zip(p, repetition)])
    result.extra.update(wins=int((p > 0.5).sum()), ties=int((p == 0.5).sum()), losses=int((p < 0.5).sum()),
                        prompts=prompts, policy_answers=list(policy_answers), base_answers=list(base_answers))
    return result
