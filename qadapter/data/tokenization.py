"""Tokenize normalized preference pairs into shared prompt ids and per-response ids.

Conversational pairs use the tokenizer's chat template: prompt ids are the template of the
prompt messages with the generation prompt, and a response's ids are what the template of
prompt + response adds after them, ending at the end-of-turn token (``tokenizer.eos_token_id``).
Standard (string) pairs follow TRL: ``tokenizer(prompt)`` for the prompt, and
``tokenizer(response, add_special_tokens=False) + [eos]`` for each response.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from datasets import Dataset

from ..errors import ConfigError, option
from .formats import PreferenceDataError

#: tokenize_pairs refuses a max_length that leaves no room for the prompt of more than this share
#: of the pairs (their longer response alone fills max_length, so the prompt would be cut away).
MAX_PROMPT_CUT_SHARE = 0.5

_NOT_PREFIX_WARNING = (
    "the chat template renders the prompt differently when a response follows it (some "
    "templates rewrite earlier turns), so the prompt ids are not a prefix of prompt + response. "
    "The longest common prefix is used as the prompt boundary; the rest of the rendered prompt "
    "is scored as part of the response."
)
_NO_EOS_WARNING = (
    "the chat template does not end the assistant turn with tokenizer.eos_token, so responses "
    "carry no end-of-turn token; set tokenizer.eos_token to the template's end-of-turn token."
)


@dataclass
class TokenizeReport:
    """Counts from :func:`tokenize_pairs`, over the pairs it kept (every pair, unless
    ``drop_longer_than`` dropped the longer ones: those are counted in ``n_dropped`` only)."""

    n_pairs: int = 0  # pairs kept
    n_prompt_truncated: int = 0
    n_response_truncated: int = 0  # pairs where chosen or rejected was cut
    n_prompt_not_prefix: int = 0
    n_response_no_eos: int = 0
    n_no_room_for_prompt: int = 0  # pairs whose longer response alone fills max_length
    max_length: int = 512
    max_prompt_length: int | None = None
    longest_pair: int = 0  # prompt + longer response, untruncated, of the longest pair kept
    drop_longer_than: int | None = None
    n_dropped: int = 0  # pairs longer than drop_longer_than, left out of the dataset and the counts above
    kept: list[int] = field(default_factory=list, repr=False)  # input index of each pair kept, in order

    def summary(self) -> str:
        text = (f"tokenized {self.n_pairs} pairs (max_length={self.max_length}, "
                f"max_prompt_length={self.max_prompt_length}): "
                f"{self.n_prompt_truncated} prompts cut from the left, "
                f"{self.n_response_truncated} pairs with a response cut from the right")
        if self.n_prompt_not_prefix:
            text += f", {self.n_prompt_not_prefix} prompts not a prefix of the full template"
        if self.n_response_no_eos:
            text += f", {self.n_response_no_eos} pairs without an end-of-turn token"
        if self.n_no_room_for_prompt:
            text += f", {self.n_no_room_for_prompt} pairs whose response leaves no room for the prompt"
        if self.drop_longer_than is not None:
            text += (f"; {self.n_dropped} pairs longer than {self.drop_longer_than} tokens dropped "
                     f"before these counts")
        return text


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    # transformers 5 returns a BatchEncoding by default, 4.x a plain list: accept both.
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _response_message(response) -> dict:
    if isinstance(response, dict):
        return response
    if isinstance(response, list) and len(response) == 1:
        return response[0]
    raise ValueError("a conversational response must be one assistant message (or a list "
                     f"holding one), got {response!r:.80}")


def _untruncated_ids(prompt, chosen, rejected, tokenizer, eos: int):
    """(prompt_ids, chosen_ids, rejected_ids, prompt_not_prefix, response_no_eos)."""
    if isinstance(prompt, str):
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        responses = [list(tokenizer(r, add_special_tokens=False)["input_ids"]) + [eos]
                     for r in (chosen, rejected)]
        return prompt_ids, *responses, False, False

    prompt_ids = _template_ids(tokenizer, prompt, add_generation_prompt=True)
    fulls = [_template_ids(tokenizer, prompt + [_response_message(r)], add_generation_prompt=False)
             for r in (chosen, rejected)]
    # Chosen and rejected must share one prompt: cut both at the shorter common prefix.
    boundary = min(_common_prefix_len(prompt_ids, full) for full in fulls)
    not_prefix = boundary < len(prompt_ids)
    responses, no_eos = [], False
    for full in fulls:
        response = full[boundary:]
        if eos in response:  # drop what follows the end-of-turn token ("\n" in ChatML)
            response = response[: len(response) - response[::-1].index(eos)]
        else:
            no_eos = True
        responses.append(response)
    return prompt_ids[:boundary], *responses, not_prefix, no_eos


def tokenize_pair(prompt, chosen, rejected, tokenizer, *, max_length: int = 512,
                  max_prompt_length: int | None = None) -> dict:
    """Tokenize one normalized pair and truncate it.

    ``prompt`` is a string or a list of messages; ``chosen``/``rejected`` are strings, or one
    assistant message (a dict, or a one-element list as in normalized rows).

    Truncation keeps the responses and cuts the prompt from the left: first to
    ``max_prompt_length``; then, when prompt + the longer response exceeds ``max_length``, to
    ``max(max_length - len(longer response), min(len(prompt), max_length // 4))`` tokens; if
    still too long, each response is cut from the right to fit ``max_length`` with the prompt.

    Returns a dict with ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``
    (response ids only), ``untruncated_length`` (prompt + longer response before truncation)
    and booleans ``prompt_truncated``, ``response_truncated``, ``prompt_not_prefix`` and
    ``response_no_eos``.
    """
    check_lengths(max_length, max_prompt_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token to the token "
                         "that ends an assistant turn")
    p, c, r, not_prefix, no_eos = _untruncated_ids(prompt, chosen, rejected, tokenizer, eos)
    if not p:
        raise ValueError("the pair has no prompt tokens; the first response token needs a "
                         "prompt state to be scored from")

    n_prompt = len(p)
    untruncated_length = n_prompt + max(len(c), len(r))
    if max_prompt_length is not None:
        p = p[-max_prompt_length:]
    longer = max(len(c), len(r))
    if len(p) + longer > max_length:
        keep = max(max_length - longer, min(len(p), max(1, max_length // 4)))
        p = p[-keep:]
    budget = max_length - len(p)
    response_truncated = longer > budget
    c, r = c[:budget], r[:budget]
    if not_prefix:
        warnings.warn(_NOT_PREFIX_WARNING, stacklevel=2)
    if no_eos:
        warnings.warn(_NO_EOS_WARNING, stacklevel=2)
    return {
        "prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r,
        "untruncated_length": untruncated_length, "prompt_length": n_prompt,
        "prompt_truncated": len(p) < n_prompt, "response_truncated": response_truncated,
        "prompt_not_prefix": not_prefix, "response_no_eos": no_eos,
    }


def check_lengths(max_length, max_prompt_length=None) -> None:
    """Refuse a token budget that leaves no room for a prompt token and a response token."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"{option('max_length')} must be an integer ≥ 2 (at least one prompt token and one "
                          f"response token), got {max_length!r}")
    if max_prompt_length is not None and (isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int)
                                          or not 1 <= max_prompt_length < max_length):
        raise ConfigError(f"{option('max_prompt_length')} must be an integer from 1 to {option('max_length')} - 1 "
                          f"= {max_length - 1} (room for the response), got {max_prompt_length!r}")


def check_prompt_room(report: TokenizeReport, needed: list[int], max_share: float = MAX_PROMPT_CUT_SHARE) -> None:
    """Refuse ``report.max_length`` when more than ``max_share`` of the pairs have no room for their
    prompt (``needed[i]``: the longer response of pair i + 1 token), with the counts and the
    max_length that would fit."""
    n, total = report.n_no_room_for_prompt, report.n_pairs
    if not total or n <= max_share * total:
        return
    allowed = int(max_share * total)  # pairs that may still have no room
    fit = sorted(needed)[total - 1 - allowed]  # the smallest max_length leaving room for the rest
    raise ConfigError(
        f"{option('max_length', report.max_length)} leaves no room for the prompt of {n} of {total} pairs "
        f"({n / total:.0%}, more than the {max_share:.0%} allowed): their longer response alone has "
        f"{report.max_length} tokens or more, so the prompt would be cut away and the response cut too. "
        f"{option('max_length', fit)} leaves room for the prompt of at least {1 - max_share:.0%} of the pairs, "
        f"{option('max_length', report.longest_pair)} fits every pair whole.")


def tokenize_pairs(dataset: Dataset, tokenizer, *, max_length: int = 512,
                   max_prompt_length: int | None = None,
                   max_prompt_cut_share: float | None = MAX_PROMPT_CUT_SHARE,
                   drop_longer_than: int | None = None) -> tuple[Dataset, TokenizeReport]:
    """Tokenize every normalized pair (see :func:`tokenize_pair` for ids and truncation).

    With ``drop_longer_than`` N, a pair whose prompt + longer response has more than N tokens
    (untruncated) is dropped: left out of the returned dataset and counted in ``n_dropped``, never
    cut. Every other count, and the prompt-room check below, covers the kept pairs only.

    Returns a dataset with ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``,
    ``untruncated_length`` and ``row`` (and ``source`` when present), in the input's order, and a
    :class:`TokenizeReport` counting truncations and template mismatches (``report.kept``: the
    input index of each returned pair).

    Raises :class:`~qadapter.errors.ConfigError` when ``max_length`` leaves no room for the prompt
    of more than ``max_prompt_cut_share`` of the kept pairs (None: never), and
    :class:`~qadapter.data.PreferenceDataError` naming the row of a pair that cannot be tokenized.
    """
    check_lengths(max_length, max_prompt_length)
    if drop_longer_than is not None and (isinstance(drop_longer_than, bool) or not isinstance(drop_longer_than, int)
                                         or drop_longer_than < 2):
        raise ConfigError(f"{option('drop_longer_than')} must be an integer ≥ 2 (tokens), got {drop_longer_than!r}")
    report = TokenizeReport(max_length=max_length, max_prompt_length=max_prompt_length,
                            drop_longer_than=drop_longer_than)
    needed = []
    keep = [k for k in ("row", "source") if k in dataset.column_names]
    columns: dict[str, list] = {k: [] for k in
                                ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                                 "untruncated_length", *keep)}
    with warnings.catch_warnings():  # summarized once below instead of once per pair
        warnings.simplefilter("ignore")
        for i, example in enumerate(dataset):
            try:
                out = tokenize_pair(example["prompt"], example["chosen"], example["rejected"],
                                    tokenizer, max_length=max_length,
                                    max_prompt_length=max_prompt_length)
            except (ValueError, TypeError, KeyError) as e:
                if isinstance(e, ConfigError):
                    raise
                where = example.get("source", "<dataset>")
                row = example.get("row", i)
                raise PreferenceDataError(f"{where}, row {row}: cannot tokenize the pair ({e})",
                                          reason="cannot tokenize", source=where, row=row) from None
            if drop_longer_than is not None and out["untruncated_length"] > drop_longer_than:
                report.n_dropped += 1
                continue
            report.kept.append(i)
            for k in columns:
                columns[k].append(out[k] if k in out else example[k])
            report.n_pairs += 1
            report.n_prompt_truncated += out["prompt_truncated"]
            report.n_response_truncated += out["response_truncated"]
            report.n_prompt_not_prefix += out["prompt_not_prefix"]
            report.n_response_no_eos += out["response_no_eos"]
            longer = out["untruncated_length"] - out["prompt_length"]
            needed.append(longer + 1)
            report.n_no_room_for_prompt += longer >= max_length
            report.longest_pair = max(report.longest_pair, out["untruncated_length"])
    if report.n_prompt_not_prefix:
        warnings.warn(f"{report.n_prompt_not_prefix} of {report.n_pairs} pairs: "
                      + _NOT_PREFIX_WARNING, stacklevel=2)
    if report.n_response_no_eos:
        warnings.warn(f"{report.n_response_no_eos} of {report.n_pairs} pairs: "
                      + _NO_EOS_WARNING, stacklevel=2)
    if max_prompt_cut_share is not None:
        check_prompt_room(report, needed, max_prompt_cut_share)
    return Dataset.from_dict(columns), report
