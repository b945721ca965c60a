"""Fluency: does the policy still answer general prompts the way a chat model does, or has it
started to loop, to shrink its vocabulary, to write text its base model finds unnatural?

For each held-out general prompt (the shipped UltraFeedback prompts the ``kl`` evaluation draws
from; only their first user turn, no answer) the policy answers greedily in at most
``max_new_tokens`` tokens, and each answer gets four numbers, averaged over prompts with the shared
bootstrap interval over prompts:

* ``repeated_4grams``: the fraction of its word 4-grams already seen earlier in it
  (:func:`~qadapter.evaluation.repetition.repeated_ngram_fractions`; 0 never repeats, near 1 a loop);
* ``distinct_2``: distinct word bigrams / word bigrams (1 never repeats a bigram; answers of fewer
  than two words have no bigram and are left out of this mean);
* ``length``: the answer's length in tokens (its re-encoded text), and ``at_cap`` whether generation
  stopped at ``max_new_tokens`` instead of at the end-of-turn token;
* ``base_nll``: the base model π1's mean negative log-likelihood per token of the answer, given the
  rendered prompt, scored by the one scorer (:func:`qadapter.evaluation.continuation_logprobs` →
  :func:`qadapter.scoring.score`): how natural π1 finds the text. Empty answers are left out of it.

Lower ``repeated_4grams`` and ``base_nll`` and higher ``distinct_2`` read as more fluent; a policy is
compared with the base model's own answers (the base point of a comparison).
"""

from __future__ import annotations

from typing import Any, Sequence

from ..chat import as_messages, encode_prompt
from .benchmarks import load_general_prompts
from .policy import encode
from .repetition import repeated_ngram_fractions
from .scoring import continuation_logprobs, generate_texts
from .stats import EvalResult, make_metric, subsample

__all__ = ["FLUENCY_PROMPTS", "distinct_n", "answer_statistics", "evaluate_fluency"]

#: prompts drawn when no limit is given: at 100 the interval of repeated 4-grams is about ±0.07 on
#: the base model (docs/evaluation.md), and it costs ~20 CPU-minutes at 256 tokens
FLUENCY_PROMPTS = 100


def distinct_n(text: str, n: int = 2) -> float | None:
    """Distinct word n-grams / word n-grams of ``text``; None for a text with no n-gram."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def answer_statistics(answers: Sequence[str], lengths: Sequence[int], max_new_tokens: int) -> list[dict[str, Any]]:
    """Per answer: repeated 4-grams, distinct-2 (None without a bigram), token length, at the cap."""
    reps = repeated_ngram_fractions(answers, 4)
    return [{"repeated_4grams": rep, "distinct_2": distinct_n(a, 2), "length": int(n),
             "at_cap": float(n >= max_new_tokens)} for a, rep, n in zip(answers, reps, lengths)]


def _base_nll(base, prompts, answers, batch_size: int, progress: bool) -> list[float | None]:
    """π1's mean per-token NLL of each answer after its rendered prompt (None for an empty answer)."""
    out: list[float | None] = [None] * len(answers)
    if not any(answers):
        return out
    tok = base.tokenizer
    rows = [(i, encode_prompt(tok, p), encode(tok, a)) for i, (p, a) in enumerate(zip(prompts, answers)) if a]
    rows = [r for r in rows if r[2]]
    scored = continuation_logprobs(base, [(p, a) for _, p, a in rows], batch_size=batch_size, progress=progress,
                                   desc="fluency: base NLL")
    for (i, _, ids), (logprob, _) in zip(rows, scored):
        out[i] = -logprob / len(ids)
    return out


def evaluate_fluency(policy, base, *, prompts: Sequence[Any] | None = None, limit: int | None = None, seed: int = 0,
                     max_new_tokens: int = 256, batch_size: int = 8, data_dir=None, progress: bool = True,
                     n_boot: int = 1000) -> EvalResult:
    """The fluency of ``policy``'s greedy answers (the module docstring), the NLL scored by ``base``
    (π1; for the base model itself, the policy). ``prompts`` (user turns or message lists), default
    ``limit`` (:data:`FLUENCY_PROMPTS` if None) prompts drawn (seeded) from :func:`load_general_prompts`.
    Primary: ``repeated_4grams``."""
    if prompts is None:
        prompts = subsample(load_general_prompts(data_dir), FLUENCY_PROMPTS if limit is None else limit, seed)
    elif limit is not None:
        prompts = subsample(prompts, limit, seed)
    messages = [as_messages(p) for p in prompts]
    answers = generate_texts(policy, messages, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress, desc="fluency answers")
    lengths = [len(encode(policy.tokenizer, a)) for a in answers]
    stats = answer_statistics(answers, lengths, max_new_tokens)
    nlls = _base_nll(base, messages, answers, batch_size, progress)
    samples = [{"index": i, "answer": a, **s, "base_nll": nll}
               for i, (a, s, nll) in enumerate(zip(answers, stats, nlls))]
    metrics = {name: make_metric([s[name] for s in samples if s[name] is not None], n_boot, seed)
               for name in ("repeated_4grams", "distinct_2", "length", "at_cap", "base_nll")}
    result = EvalResult("fluency", len(samples), metrics, "repeated_4grams",
                        {"limit": limit, "seed": seed, "max_new_tokens": max_new_tokens, "n_prompts": len(messages)},
                        samples=samples)
    result.extra.update(empty_answers=sum(not a.strip() for a in answers),
                        no_bigram=sum(s["distinct_2"] is None for s in samples), prompts=messages)
    return result
