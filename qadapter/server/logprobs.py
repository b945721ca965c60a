"""Log-probabilities for OpenAI's ``logprobs`` / ``top_logprobs`` (chat) and ``logprobs`` / ``echo``
(completions), computed AFTER decoding by one teacher-forced pass of the project's one scorer
(:func:`qadapter.scoring.score`) over prompt + answer, under the request's own policy: π1 for the
base model, π̃ at the request's (α0, α̃) for an adapter.

Why after, not during decoding: the decoding loop stays as it is, and the numbers are exactly the
scorer's (the same ones ``qadapter eval`` and lm-eval through ``qadapter-lm-eval`` use). It costs one
more forward over the request's tokens.

The decoder thread owns the model while it decodes; the scorer runs only while the decoder is idle:
it holds the scheduler's condition (which the decoder needs to take its next batch) and waits for
``running == 0``. A long-running batch therefore delays a logprobs answer until it ends, and a new
request's submission waits for the (one-forward) scoring.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from ..scoring import score


@dataclass
class Scored:
    """One choice's tokens with their log-probs; with echo the prompt's first token has none."""

    ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]
    prompt_len: int  # how many of ``ids`` are the prompt's (0 without echo)


def answer_ids(served, row, text: str) -> list[int]:
    """The tokens of the answer as returned: a row that stopped (end-of-turn token or a stop string)
    reports the fewest tokens whose text covers the answer's, so neither the end-of-turn token nor
    the tokens of a stop string past the text are listed (as OpenAI lists them); else all."""
    ids = list(row.new_ids)
    if row.finish_reason != "stop":
        return ids
    with served.tokenizer_lock:
        for k in range(len(ids) + 1):
            if len(served.tokenizer.decode(ids[:k], skip_special_tokens=True)) >= len(text):
                return ids[:k]
    return ids


def _requests(req, rows, answers):
    out = []
    for r, answer in zip(rows, answers):
        if req.echo:  # the first prompt token has no context: it gets no log-prob (OpenAI's None)
            out.append((r.prompt_ids[:1], r.prompt_ids[1:] + answer))
        else:
            out.append((r.prompt_ids, answer))
    return out


def _score_now(served, req, rows, texts) -> list[Scored]:
    model = served.model
    kwargs = {"policies": ("base",)}
    if req.adapter is not None:
        adapter = served.adapters[req.adapter]
        model.set_adapter(adapter.peft_name)
        kwargs = {"settings": adapter.settings, "policies": (), "alphas": [req.alphas]}
    answers = [answer_ids(served, r, text) for r, text in zip(rows, texts)]
    scores = score(model, _requests(req, rows, answers), pad_token_id=served.tokenizer.pad_token_id or 0, allow_empty=True,
                   top_logprobs=req.logprobs, **kwargs)
    name = scores.names[0]
    out = []
    for i, r in enumerate(rows):
        lead = r.prompt_ids[:1] if req.echo else []
        ids = lead + (r.prompt_ids[1:] if req.echo else []) + answers[i]
        out.append(Scored(ids, [None] * len(lead) + scores.token_logprobs[name][i],
                          [None] * len(lead) + scores.top_logprobs[name][i], len(r.prompt_ids) if req.echo else 0))
    return out


def _while_idle(sched, fn):
    """Run ``fn()`` while the decoder thread is between batches (see the module's docstring)."""
    with sched.cv:
        sched.cv.wait_for(lambda: sched.running == 0 or sched.closed)
        return fn()


async def score_rows(served, sched, req, rows, texts) -> list[Scored]:
    """The tokens and log-probs of every finished row of ``req`` (whose answers are ``texts``),
    scored off the event loop."""
    return await asyncio.to_thread(_while_idle, sched, lambda: _score_now(served, req, rows, texts))


def _piece(served, ids) -> list[str]:
    with served.tokenizer_lock:
        return [served.tokenizer.decode([t], skip_special_tokens=False) for t in ids]


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; OpenAI reports -9999 for impossible tokens


def chat_logprobs(served, scored: Scored, top: int) -> dict:
    """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    texts = _piece(served, scored.ids)
    content = []
    for text, lp, alts in zip(texts, scored.logprobs, scored.top):
        alt_texts = _piece(served, [t for t, _ in alts[:top]])
        content.append({"token": text, "logprob": _finite(lp), "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": s, "logprob": _finite(v), "bytes": list(s.encode("utf-8"))}
                                         for s, (_, v) in zip(alt_texts, alts[:top])]})
    return {"content": content, "refusal": None}


def completion_logprobs(served, scored: Scored, top: int, echo: bool) -> dict:
    """OpenAI's legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs (a dict per
    token, ``{token text: log-prob}``; the first prompt token's None with echo) and text_offset."""
    texts = _piece(served, scored.ids)
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    tops = []
    for alts in scored.top:
        if alts is None:
            tops.append(None)
            continue
        alt_texts = _piece(served, [t for t, _ in alts[:top]])
        tops.append({s: _finite(v) for s, (_, v) in zip(alt_texts, alts[:top])})
    return {"tokens": texts, "token_logprobs": [None if lp is None else _finite(lp) for lp in scored.logprobs],
            "top_logprobs": tops, "text_offset": offsets}
