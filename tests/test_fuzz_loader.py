"""Fuzzing the preference-data loader (hypothesis): malformed files in every format it accepts
(.json, .jsonl, .parquet; TRL's four preference formats and raw HH-RLHF transcripts) end in a
``PreferenceDataError`` naming the file, or load with every skipped row counted, and the loaded
pairs tokenize or fail the same way; never any other exception. Each test prints how many cases
it ran."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_tokenizer
from qadapter.data import PreferenceDataError, load_preference_pairs, tokenize_pairs

TOKENIZER = make_tiny_tokenizer()
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CASES = {"rows": 0, "files": 0, "bytes": 0, "unwritable": 0, "errors": 0, "loaded": 0, "skipped_rows": 0, "other": 0}

words = st.lists(st.sampled_from(["w1", "w2", "w3", "w4", "w5", "w6", "hello", "é", "\t", " ", "\n"]), max_size=6).map(" ".join)
weird_text = st.one_of(
    words, st.text(max_size=20), st.just(""), st.just("\x00"), st.just("\ud800"), st.just("\ufeff"),
    st.just("\r\n"), st.just("w1 " * 20000),  # a huge string
    st.just("\n\nHuman: w1\n\nAssistant: w2"), st.just("Human:"), st.just("\n\nAssistant: w2"))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                        st.floats(allow_nan=True, allow_infinity=True), weird_text)
garbage = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                       max_leaves=8)
role = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.sampled_from(["tool", "", "USER"]), garbage)
message = st.one_of(st.fixed_dictionaries({"role": role, "content": weird_text}),
                    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": garbage}),
                    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"])}), garbage)


def conv(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@st.composite
def valid_row(draw):
    """A well-formed row in one of the five accepted formats."""
    p, c, r = draw(words), draw(words), draw(words)
    fmt = draw(st.sampled_from(["standard_explicit", "standard_implicit", "conversational_explicit",
                                "conversational_implicit", "hh_rlhf_transcript"]))
    if fmt == "standard_explicit":
        return {"prompt": p, "chosen": c, "rejected": r}
    if fmt == "standard_implicit":
        return {"chosen": p + c, "rejected": p + r}
    if fmt == "conversational_explicit":
        return {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}]}
    if fmt == "conversational_implicit":
        return {"chosen": conv(p, c), "rejected": conv(p, r)}
    return {"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}


@st.composite
def mutated_row(draw):
    """A valid row, then: keys dropped, extra keys, values replaced by wrong types or nested garbage."""
    row = draw(valid_row())
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "extra", "replace", "message", "text", "none"]))
        keys = sorted(row) or ["chosen"]
        key = draw(st.sampled_from(keys))
        if action == "drop":
            row.pop(key, None)
        elif action == "extra":
            row[draw(st.sampled_from(["extra", "score", "row", "source", "id", "prompt"]))] = draw(garbage)
        elif action == "replace":
            row[key] = draw(garbage)
        elif action == "message":
            row[key] = draw(st.lists(message, max_size=4))
        elif action == "text":
            row[key] = draw(weird_text)
    return draw(st.one_of(st.just(row), st.just(row), st.just(row), garbage))


def dumps(value, ascii_only: bool = True) -> str:
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)


def check(path: Path, skip_invalid: bool, allow_empty: bool) -> None:
    """The property: a data error naming the file, or a load whose counts add up; same for tokenizing.
    Any other exception is counted (for the summary) and fails the test."""
    try:
        _check(path, skip_invalid, allow_empty)
    except (PreferenceDataError, AssertionError):
        raise
    except Exception:
        CASES["other"] += 1
        raise


def _check(path: Path, skip_invalid: bool, allow_empty: bool) -> None:
    try:
        pairs, report = load_preference_pairs(path, skip_invalid=skip_invalid, allow_empty_response=allow_empty)
    except PreferenceDataError as e:
        assert path.name in str(e), str(e)
        CASES["errors"] += 1
        return
    assert report.n_kept == len(pairs) > 0
    assert report.n_kept + len(report.skipped) == report.n_read
    assert len(report.details) == len(report.skipped)
    assert skip_invalid or not report.skipped
    CASES["loaded"] += 1
    CASES["skipped_rows"] += len(report.skipped)
    try:
        ids, tok = tokenize_pairs(pairs, TOKENIZER, max_length=64)
    except PreferenceDataError as e:
        assert path.name in str(e), str(e)
        return
    assert tok.n_pairs == len(ids) == len(pairs)


@st.composite
def jsonl_bytes(draw):
    rows = draw(st.lists(st.one_of(valid_row(), mutated_row()), min_size=0, max_size=6))
    if rows and draw(st.booleans()):
        rows += rows[: draw(st.integers(1, len(rows)))]  # duplicate rows
    ascii_only = draw(st.booleans())  # False: raw UTF-8 (and raw lone surrogates) in the file
    lines = [dumps(r, ascii_only).encode("utf-8", "surrogatepass") for r in rows]
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.binary(max_size=12)))  # a garbage line
    sep = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    data = sep.join(lines) + draw(st.sampled_from([b"", sep]))
    if data and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # truncated (last line cut)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\x00" + data[at:]  # a NUL byte
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data  # BOM
    return data


@st.composite
def json_bytes(draw):
    kind = draw(st.sampled_from(["array", "array", "not a list", "deep", "pretty"]))
    rows = draw(st.lists(st.one_of(valid_row(), mutated_row()), min_size=0, max_size=5))
    if kind == "array":
        text = dumps(rows)
    elif kind == "pretty":
        text = json.dumps(rows, indent=2)
    elif kind == "deep":
        text = "[" * 100000 + "]" * draw(st.sampled_from([0, 100000]))
    else:
        text = dumps(draw(st.one_of(garbage, st.just({"data": rows}))))
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data = data.replace(b"\n", b"\r\n")
    if data and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    return data


def _with_suffix(data: bytes, suffix: str, skip_invalid: bool, allow_empty: bool, kind: str) -> None:
    CASES[kind] += 1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"pairs{suffix}"
        path.write_bytes(data)
        check(path, skip_invalid, allow_empty)


@settings(max_examples=250, **SETTINGS)
@given(jsonl_bytes(), st.sampled_from([".jsonl", ".json"]), st.booleans(), st.booleans())
def test_fuzz_json_lines(data, suffix, skip_invalid, allow_empty):
    _with_suffix(data, suffix, skip_invalid, allow_empty, "files")


@settings(max_examples=150, **SETTINGS)
@given(json_bytes(), st.booleans(), st.booleans())
def test_fuzz_json_array(data, skip_invalid, allow_empty):
    _with_suffix(data, ".json", skip_invalid, allow_empty, "files")


@settings(max_examples=100, **SETTINGS)
@given(st.binary(max_size=200), st.sampled_from([".jsonl", ".json", ".parquet"]), st.booleans())
def test_fuzz_random_bytes(data, suffix, skip_invalid):
    _with_suffix(data, suffix, skip_invalid, False, "bytes")


@st.composite
def parquet_table(draw):
    """Rows as parquet: the right columns, wrong or missing ones, wrong types (one type per column,
    as parquet demands; a column that pyarrow cannot type is stored as JSON text)."""
    rows = draw(st.lists(st.one_of(valid_row(), mutated_row()), min_size=1, max_size=5))
    rows = [r if isinstance(r, dict) else {"value": r} for r in rows]
    if draw(st.booleans()):  # wrong column names
        rename = {"chosen": "chosen_response", "rejected": "reject", "prompt": "question"}
        rows = [{rename.get(k, k): v for k, v in r.items()} for r in rows]
    columns = sorted({k for r in rows for k in r})
    arrays = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        try:
            arrays[col] = pa.array(values)
        except (pa.ArrowException, OverflowError, TypeError, ValueError, UnicodeError):
            arrays[col] = pa.array([None if v is None else json.dumps(v) for v in values])
    return pa.table(arrays) if arrays else pa.table({"x": [1]})


@settings(max_examples=100, **SETTINGS)
@given(parquet_table(), st.booleans(), st.booleans())
def test_fuzz_parquet(table, skip_invalid, truncate):
    CASES["files"] += 1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.parquet"
        try:
            pq.write_table(table, path)
        except (pa.ArrowException, UnicodeError):
            CASES["unwritable"] += 1  # pyarrow could not write it: nothing reached the loader
            return
        if truncate:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        check(path, skip_invalid, False)


@settings(max_examples=150, **SETTINGS)
@given(st.lists(st.one_of(valid_row(), mutated_row()), min_size=0, max_size=6), st.booleans())
def test_fuzz_rows_in_memory(rows, skip_invalid):
    """The same rows given as a Python list (the API's other way in)."""
    CASES["rows"] += 1
    try:
        pairs, report = load_preference_pairs(rows, skip_invalid=skip_invalid)
    except PreferenceDataError as e:
        assert "<list>" in str(e)
        CASES["errors"] += 1
        return
    except Exception:
        CASES["other"] += 1
        raise
    CASES["loaded"] += 1
    CASES["skipped_rows"] += len(report.skipped)
    assert report.n_kept + len(report.skipped) == report.n_read and len(pairs) == report.n_kept


def test_fuzz_mixed_formats_in_one_file(tmp_path):
    """Every pair of formats in one file: an error naming the second row's format, or (with
    skip_invalid) that row skipped and counted."""
    rows = {"se": {"prompt": "w1", "chosen": "w2", "rejected": "w3"}, "si": {"chosen": "w1 w2", "rejected": "w1 w3"},
            "ce": {"prompt": [{"role": "user", "content": "w1"}], "chosen": [{"role": "assistant", "content": "w2"}],
                   "rejected": [{"role": "assistant", "content": "w3"}]},
            "ci": {"chosen": conv("w1", "w2"), "rejected": conv("w1", "w3")}}
    n = 0
    for a in rows:
        for b in rows:
            if a == b:
                continue
            path = tmp_path / f"{a}_{b}.jsonl"
            path.write_text(json.dumps(rows[a]) + "\n" + json.dumps(rows[b]) + "\n", encoding="utf-8")
            try:
                pairs, report = load_preference_pairs(path)
            except PreferenceDataError as e:
                assert "line 2" in str(e) and ("format" in str(e) or "prompt" in str(e)), str(e)
                pairs, report = load_preference_pairs(path, skip_invalid=True)
                assert report.n_kept == 1 and report.skipped[0][0] == 2
            else:
                # a string pair with and without 'prompt' cannot be told apart from an implicit one
                assert {a, b} <= {"si", "se"} or len(pairs) == 2
            n += 1
    assert n == 12


def test_duplicate_rows_are_counted(tmp_path):
    row = {"prompt": "w1", "chosen": "w2", "rejected": "w3"}
    path = tmp_path / "dups.jsonl"
    path.write_text("\r\n".join(json.dumps(r) for r in [row, row, {**row, "chosen": "w4"}, row]) + "\r\n", encoding="utf-8")
    pairs, report = load_preference_pairs(path)
    assert len(pairs) == 4 and report.n_duplicates == 2 and "2 kept rows repeat an earlier pair" in report.summary()


def test_zz_print_case_counts(capsys):
    """Runs last in this file: how many fuzz cases ran and how each ended, all as counted. Every case
    that reached the loader ended in a data error, a load, or another exception (which also failed
    its test); run alone, without the fuzz tests, there is nothing to count."""
    total = CASES["rows"] + CASES["files"] + CASES["bytes"]
    ended = CASES["errors"] + CASES["loaded"] + CASES["other"] + CASES["unwritable"]
    assert ended == total, CASES
    with capsys.disabled():
        print(f"\nfuzzed the loader with {total} cases ({CASES['files']} files, {CASES['bytes']} random-byte files, "
              f"{CASES['rows']} in-memory row lists; {CASES['unwritable']} tables pyarrow could not write): "
              f"{CASES['errors']} data errors, {CASES['loaded']} loads ({CASES['skipped_rows']} rows skipped and "
              f"counted), {CASES['other']} other exceptions")
