"""Load preference pairs and normalize them to TRL's explicit-prompt form.

Accepted row formats (the format is fixed by the first row; mixing formats is an error):

============================  ===============================================================
``standard_explicit``         ``{"prompt": str, "chosen": str, "rejected": str}``
``standard_implicit``         ``{"chosen": str, "rejected": str}``: prompt = common prefix
``conversational_explicit``   ``{"prompt": [msgs], "chosen": [msg], "rejected": [msg]}``
``conversational_implicit``   ``{"chosen": [msgs], "rejected": [msgs]}``: prompt = all but the
                              last message, which must be the only difference
``hh_rlhf_transcript``        raw Anthropic HH-RLHF: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
                              strings, parsed into user/assistant messages (then as above)
============================  ===============================================================

Normalized rows: ``prompt`` (str, or a list of messages that may open with a system message and
ends with a user message), ``chosen`` and ``rejected`` (str, or a one-element list holding the
final assistant message), every extra key of the source row, ``row`` and ``source``.

``row`` numbers a row in its source: the **1-based line number** for JSON-lines content (``.jsonl``,
or a ``.json`` file that is not one JSON array), the **0-based index** for a JSON array, a
``.parquet`` file, a ``datasets.Dataset`` or a list. Error messages say "line N" or "row N"
accordingly. ``source`` is the file name, ``"<dataset>"`` or ``"<list>"``; an existing
``row``/``source`` column in the input is replaced.

Why one module of ~450 lines: every accepted input format (TRL's conversational and standard
pairs, HH's transcripts, UltraFeedback's scored completions) and its row-level error messages
are read by one normalizer; each format is one short function.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from pyarrow import ArrowException

from ..errors import UserError, option

logger = logging.getLogger(__name__)

EMBEDDED_PAIRS_PATH = Path(__file__).parent / "hh_rlhf_harmless" / "pairs.jsonl"
ROLES = ("system", "user", "assistant")
_ORDER_RULE = (
    "a conversation starts with a user message (optionally after one system message), "
    "alternates user/assistant and ends with the assistant response"
)
# HH-RLHF transcripts: turns separated by "\n\nHuman: " / "\n\nAssistant: " (the first turn
# may lack the blank line when the text was stripped).
_HH_START = re.compile(r"\s*Human:")
_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant): ?")
_OWN_KEYS = ("prompt", "chosen", "rejected", "row", "source")


class PreferenceDataError(UserError):
    """Bad preference data. ``reason`` is a short category (e.g. "empty response")."""

    def __init__(self, message: str, *, reason: str = "invalid data", source: str | None = None,
                 row: int | None = None):
        super().__init__(message)
        self.reason, self.source, self.row = reason, source, row


class _RowError(Exception):
    """A problem with one row; the loader adds file and row and raises or skips it."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass
class LoadReport:
    """What :func:`load_preference_pairs` read, kept and skipped (and why)."""

    source: str
    format: str | None = None
    n_read: int = 0
    n_kept: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row, reason category)
    n_duplicates: int = 0  # kept rows whose (prompt, chosen, rejected) repeats an earlier row (kept)
    details: list[str] = field(default_factory=list)  # the full message for each skipped row

    @property
    def counts_by_reason(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.skipped).most_common())

    def summary(self) -> str:
        text = f"read {self.n_read} rows from {self.source}, kept {self.n_kept}"
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in self.counts_by_reason.items())
            text += f", skipped {len(self.skipped)} ({reasons})"
        if self.n_duplicates:
            text += f"; {self.n_duplicates} kept rows repeat an earlier pair"
        return text


# --------------------------------------------------------------------------------------------
# Reading sources into (row number, dict or _RowError) items


def _read_json_lines(data: bytes):
    """One item per non-blank line; undecodable or unparsable lines become _RowError items."""
    items = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            items.append((lineno, _RowError(
                "not UTF-8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid "
                "UTF-8; re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")))
            continue
        try:
            items.append((lineno, json.loads(text)))
        except RecursionError:
            items.append((lineno, _RowError("invalid JSON", "JSON nested too deeply to be a preference pair")))
        except json.JSONDecodeError as e:
            items.append((lineno, _RowError(
                "invalid JSON", f"invalid JSON ({e.msg} at column {e.colno}); "
                "each line must hold exactly one JSON object")))
    return items


def _read_file(path: Path):
    if not path.is_file():
        raise PreferenceDataError(f"{path}: no such file", reason="no file", source=path.name)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return "row", list(enumerate(pq.read_table(path).to_pylist()))
        except (ArrowException, OSError, ValueError, TypeError) as e:
            raise PreferenceDataError(f"{path.name}: not a readable parquet file ({str(e)[:200]})",
                                      reason="unreadable file", source=path.name) from None
    if suffix not in (".json", ".jsonl"):
        raise PreferenceDataError(
            f"{path}: unknown extension '{path.suffix}'; give a .json, .jsonl or .parquet file, "
            "or load it yourself and pass a datasets.Dataset", reason="unknown extension",
            source=path.name)
    try:
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # tolerate a UTF-8 byte order mark
    except OSError as e:
        raise PreferenceDataError(f"{path}: cannot read it ({e.strerror or e})", reason="unreadable file",
                                  source=path.name) from None
    if suffix == ".jsonl" or not data.lstrip().startswith(b"["):
        return "line", _read_json_lines(data)
    # A JSON array is parsed as a whole, so a bad byte or syntax error cannot be skipped.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PreferenceDataError(
            f"{path.name}, line {line}: not UTF-8 (byte 0x{data[e.start]:02x}); re-save the file "
            "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)", reason="not UTF-8", source=path.name,
            row=line) from None
    try:
        rows = json.loads(text)
    except RecursionError:
        raise PreferenceDataError(f"{path.name}: JSON nested too deeply to hold preference pairs",
                                  reason="invalid JSON", source=path.name) from None
    except json.JSONDecodeError as e:
        raise PreferenceDataError(
            f"{path.name}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}); the file "
            "must hold one JSON array of objects or one JSON object per line",
            reason="invalid JSON", source=path.name, row=e.lineno) from None
    if not isinstance(rows, list):
        raise PreferenceDataError(
            f"{path.name}: expected a JSON array of objects (or JSON lines), got a "
            f"{type(rows).__name__}", reason="wrong type", source=path.name)
    return "row", list(enumerate(rows))


def _read_source(source: Any):
    """Return (source name, row label, items) for any supported source."""
    if isinstance(source, DatasetDict):
        raise PreferenceDataError(
            f"got a DatasetDict with splits {list(source)}; pick one, e.g. "
            f"dataset[{next(iter(source), 'train')!r}]", reason="wrong type", source="<dataset>")
    if isinstance(source, Dataset):
        return "<dataset>", "row", list(enumerate(source.to_list()))
    if isinstance(source, list):
        return "<list>", "row", list(enumerate(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return (path.name, *_read_file(path))
    raise PreferenceDataError(
        f"unsupported source {type(source).__name__}: give a file path, a datasets.Dataset or a "
        "list of dicts", reason="wrong type")


# --------------------------------------------------------------------------------------------
# Normalizing one row


def _row_format(row: Any) -> str:
    """The format one row is written in (raises _RowError when it has none)."""
    if not isinstance(row, dict):
        raise _RowError("wrong type", f"expected a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise _RowError("missing key", f"missing key '{key}'; a preference pair needs "
                                           "'chosen' and 'rejected' (and optionally 'prompt')")
    chosen = row["chosen"]
    if not isinstance(chosen, (str, list)):
        raise _RowError("wrong type", f"'chosen' must be a string or a list of messages, got "
                                      f"{type(chosen).__name__}")
    if row.get("prompt") is not None:
        return "conversational_explicit" if isinstance(chosen, list) else "standard_explicit"
    if isinstance(chosen, list):
        return "conversational_implicit"
    return "hh_rlhf_transcript" if _HH_START.match(chosen) else "standard_implicit"


def _messages(value: Any, key: str) -> list[dict]:
    """Check a list of {"role", "content"} messages and keep only those two keys."""
    if not isinstance(value, list) or not value:
        raise _RowError("wrong type", f"'{key}' must be a non-empty list of messages like the "
                                      f"other fields, got {value!r:.60}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), str)):
            raise _RowError("bad message", f"{key}[{i}] must be a message {{'role': "
                                           f"'system'|'user'|'assistant', 'content': str}}, got "
                                           f"{m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_order(conversation: list[dict], key: str) -> None:
    roles = [m["role"] for m in conversation]
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != expected:
            raise _RowError("wrong role order", f"{key}: message {i} has role '{roles[i]}' "
                                                f"where '{expected}' was expected; {_ORDER_RULE}")
    if roles[-1] != "assistant":
        raise _RowError("wrong role order", f"{key} ends with a '{roles[-1]}' message; "
                                            f"{_ORDER_RULE}")


def _check_responses(chosen: str, rejected: str, allow_empty: bool) -> None:
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not allow_empty and not text.strip():
            raise _RowError("empty response", f"the {key} response is empty; drop the row, fill "
                            "in the response, or pass " + option("allow_empty_response", True)
                            + " if an empty reply is meant (it still ends with the end-of-turn token)")
    if chosen == rejected:
        raise _RowError("chosen identical to rejected", "chosen and rejected responses are "
                        "identical, so the pair carries no preference; drop the row")


def _parse_hh(text: str, key: str) -> list[dict]:
    """Split a raw HH-RLHF transcript into user/assistant messages (content kept verbatim)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _RowError("wrong role order", f"{key} is not an HH-RLHF transcript: it must start "
                                            "with '\\n\\nHuman: ' and alternate with "
                                            "'\\n\\nAssistant: ' turns")
    return [{"role": "user" if who == "Human" else "assistant", "content": content}
            for who, content in zip(parts[1::2], parts[2::2])]


def _conversational(prompt: list[dict] | None, chosen: list[dict], rejected: list[dict],
                    allow_empty: bool):
    if prompt is None:  # implicit: everything but the last message is the prompt
        if chosen[:-1] != rejected[:-1]:
            i = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                     min(len(chosen), len(rejected)))
            raise _RowError("prompt mismatch", f"chosen and rejected differ before their last "
                            f"message (first difference at message {i}); only the final "
                            "assistant message may differ")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if not prompt:
            raise _RowError("wrong role order", f"chosen holds a single message, so there is no "
                                                f"prompt; {_ORDER_RULE}")
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if len(response) != 1:
            raise _RowError("wrong role order", f"'{key}' must hold exactly one assistant message "
                            f"(the response) when a prompt is given, got {len(response)}")
        _check_order(prompt + response, key)
    _check_responses(chosen[0]["content"], rejected[0]["content"], allow_empty)
    return prompt, chosen, rejected


def _standard(prompt: Any, chosen: Any, rejected: Any, allow_empty: bool):
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is not None and not isinstance(value, str):
            raise _RowError("wrong type", f"'{key}' must be a string like the other fields, got "
                                          f"{type(value).__name__}; for conversations give "
                                          "every field as a list of messages")
    if prompt is None:
        # Same boundary rule as trl.data_utils.extract_prompt (a space just before the first
        # difference goes to the responses), written out to avoid its edge cases.
        if chosen == rejected:
            _check_responses(chosen, rejected, allow_empty)
        n = len(os.path.commonprefix([chosen, rejected]))
        if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
            n -= 1
        if n == 0:
            raise _RowError("prompt mismatch", "chosen and rejected share no common prefix, so "
                            "no prompt can be extracted; add a 'prompt' key")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    _check_responses(chosen, rejected, allow_empty)
    return prompt, chosen, rejected


def _normalize_row(row: Any, fmt: str | None, allow_empty: bool = False) -> dict:
    row_fmt = _row_format(row)
    if fmt is not None and row_fmt != fmt:
        if fmt.endswith("explicit") and not row_fmt.endswith("explicit"):
            raise _RowError("missing key", "missing key 'prompt' (the other rows have one)")
        if {fmt, row_fmt} == {"standard_implicit", "hh_rlhf_transcript"}:
            row_fmt = fmt  # string pairs: the first row decides whether they are transcripts
        else:
            raise _RowError("mixed formats", f"row is {row_fmt} but the first row is {fmt}; "
                                             "all rows must share one format")
    chosen, rejected = row["chosen"], row["rejected"]
    if row_fmt == "hh_rlhf_transcript":
        if not isinstance(rejected, str):
            raise _RowError("wrong type", "'rejected' must be a string like 'chosen'")
        prompt, chosen, rejected = _conversational(
            None, _parse_hh(chosen, "chosen"), _parse_hh(rejected, "rejected"), allow_empty)
    elif row_fmt.startswith("conversational"):
        prompt = row.get("prompt")
        prompt, chosen, rejected = _conversational(
            None if prompt is None else _messages(prompt, "prompt"),
            _messages(chosen, "chosen"), _messages(rejected, "rejected"), allow_empty)
    else:
        prompt, chosen, rejected = _standard(row.get("prompt"), chosen, rejected, allow_empty)
    extras = {k: v for k, v in row.items() if k not in _OWN_KEYS}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extras}


# --------------------------------------------------------------------------------------------
# Public API


def load_preference_pairs(source: Any, *, skip_invalid: bool = False,
                          allow_empty_response: bool = False) -> tuple[Dataset, LoadReport]:
    """Load preference pairs and normalize them to TRL's explicit-prompt form.

    Args:
        source: a ``.json`` (array, or JSON lines), ``.jsonl`` or ``.parquet`` path, a
            ``datasets.Dataset`` or a list of dicts. See the module docstring for formats.
        skip_invalid: skip bad rows (and undecodable / unparsable lines) and count them in the
            report instead of raising on the first one.
        allow_empty_response: accept empty (or whitespace-only) responses. Off by default as
            they are usually broken data, but HH-RLHF harmless has a few on purpose (saying
            nothing was preferred); an empty response still ends with the end-of-turn token.

    Returns:
        The normalized dataset (columns ``prompt``, ``chosen``, ``rejected``, extra keys,
        ``row``, ``source``) and a :class:`LoadReport`.

    Raises:
        PreferenceDataError: naming the file, the row (or line) and the problem.
    """
    name, label, items = _read_source(source)
    report = LoadReport(source=name)
    for _, item in items:  # the first well-formed row fixes the format
        try:
            report.format = _row_format(item)
            break
        except _RowError:
            continue
    rows = []

    def reject(n: int, err: _RowError) -> None:
        message = f"{name}, {label} {n}: {err.message}"
        if not skip_invalid:
            raise PreferenceDataError(
                message + f" (or pass {option('skip_invalid', True)} to skip bad rows)",
                reason=err.reason, source=name, row=n) from None
        report.skipped.append((n, err.reason))
        report.details.append(message)

    for n, item in items:
        report.n_read += 1
        try:
            if isinstance(item, _RowError):
                raise item
            pair = _normalize_row(item, report.format, allow_empty_response)
            rows.append({**pair, "row": n, "source": name})
        except _RowError as err:
            reject(n, err)
    try:
        dataset = Dataset.from_list(rows) if rows else None
    except _ARROW_ERRORS:
        # Find the rows that cannot be stored on their own (an integer beyond 64 bits, a lone
        # surrogate, ...); what is left can only fail on a key whose type differs across rows.
        for pair in list(rows):
            problem = _unstorable(pair)
            if problem:
                reject(pair["row"], _RowError("unstorable value", problem))
                rows.remove(pair)
        try:
            dataset = Dataset.from_list(rows) if rows else None
        except _ARROW_ERRORS as e:
            raise PreferenceDataError(f"{name}: {_mixed_types(rows) or e}; give each key one type",
                                      reason="wrong type", source=name) from None
    report.n_kept = len(rows)
    if not rows:
        raise PreferenceDataError(f"{name}: no valid preference pairs ({report.summary()})",
                                  reason="no rows", source=name)
    n_unique = len({json.dumps([r["prompt"], r["chosen"], r["rejected"]], sort_keys=True) for r in rows})
    report.n_duplicates = len(rows) - n_unique
    if report.skipped:
        logger.warning("%s; first problem: %s", report.summary(), report.details[0])
    return dataset, report


_ARROW_ERRORS = (ArrowException, OverflowError, TypeError, ValueError, UnicodeError)


def _unstorable(pair: dict) -> str | None:
    """Why this one normalized row cannot be stored in a dataset (None: it can)."""
    for key, value in pair.items():
        try:
            Dataset.from_list([{key: value}])
        except _ARROW_ERRORS as e:
            return f"the value of '{key}' cannot be stored ({type(e).__name__}: {str(e)[:120]})"
    return None


def _mixed_types(rows: list[dict]) -> str | None:
    """'key 'x' is int in row 3 but str in row 7' for the first key whose type differs across rows."""
    seen: dict[str, tuple[str, Any]] = {}
    for r in rows:
        for key, value in r.items():
            if value is None:
                continue
            kind = type(value).__name__
            if key in seen and seen[key][0] != kind:
                return (f"key '{key}' is {seen[key][0]} in row {seen[key][1]} but {kind} in row {r['row']}")
            seen.setdefault(key, (kind, r["row"]))
    return None


def load_embedded_pairs() -> tuple[Dataset, LoadReport]:
    """The shipped HH-RLHF harmless-base test pairs (2,303 conversational implicit rows, MIT).

    Four rows (lines 87, 517, 924, 1102) have an empty chosen response: there the preferred
    harmless reply is to say nothing, so empty responses are allowed for this file.
    """
    return load_preference_pairs(EMBEDDED_PAIRS_PATH, allow_empty_response=True)
