"""Data layer: loading and validating preference pairs, splitting by prompt, tokenizing."""

import gzip
import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from qadapter.data import (
    PreferenceDataError,
    flip_labels,
    load_embedded_pairs,
    load_preference_pairs,
    select_pairs,
    split_by_prompt,
    tokenize_pair,
    tokenize_pairs,
)
from qadapter.errors import ConfigError

SHARED_HH = Path(__file__).resolve().parents[2] / "shared/data/hh_rlhf_harmless_base"

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Marks the last message, so the rendered prompt changes once a response follows it.
REWRITING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if loop.last %}{{ '*' }}"
    "{% endif %}{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(template=CHATML):
    """A byte-level tokenizer (one token per byte) with ChatML specials, built in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.add_special_tokens({"eos_token": "<|im_end|>",
                            "additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def conv_row(prompt="Hi", chosen="Hello!", rejected="Go away.", **extra):
    return {"chosen": [user(prompt), bot(chosen)], "rejected": [user(prompt), bot(rejected)],
            **extra}


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Formats


def test_standard_explicit_keeps_extra_keys():
    rows = [{"prompt": "2+2=", "chosen": "4", "rejected": "5", "domain": "math"}]
    ds, report = load_preference_pairs(rows)
    assert report.format == "standard_explicit"
    assert ds[0] == {"prompt": "2+2=", "chosen": "4", "rejected": "5", "domain": "math",
                     "row": 0, "source": "<list>"}


def test_standard_implicit_prompt_is_common_prefix():
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    ds, report = load_preference_pairs(rows)
    assert report.format == "standard_implicit"
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"]) == ("The sky is", " blue.",
                                                                     " green.")


def test_conversational_explicit_with_system_and_multi_turn(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello"), user("Bye?")]
    row = {"prompt": prompt, "chosen": [bot("Bye!")], "rejected": [bot("No.")], "query_index": 7}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([row, row | {"query_index": 8}]))
    ds, report = load_preference_pairs(path)
    assert report.format == "conversational_explicit" and report.n_kept == 2
    assert ds[1]["prompt"] == prompt and ds[1]["chosen"] == [bot("Bye!")]
    assert (ds[1]["row"], ds[1]["source"], ds[1]["query_index"]) == (1, "pairs.json", 8)


def test_conversational_implicit_multi_turn_jsonl_rows_are_line_numbers(tmp_path):
    turns = [user("a"), bot("b"), user("c")]
    row = {"chosen": turns + [bot("good")], "rejected": turns + [bot("bad")], "domain": "x"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [row, "", row])  # blank line 2 is not a row
    ds, report = load_preference_pairs(path)
    assert report.format == "conversational_implicit"
    assert ds["row"] == [1, 3]
    assert ds[0]["prompt"] == turns
    assert ds[0]["chosen"] == [bot("good")] and ds[0]["rejected"] == [bot("bad")]
    assert ds[0]["domain"] == "x"


def test_hh_rlhf_transcript_is_parsed():
    common = "\n\nHuman: How do I cook rice?\n\nAssistant: Boil it.\n\nHuman: How long?"
    ds, report = load_preference_pairs([{"chosen": common + "\n\nAssistant: About 18 minutes.",
                                         "rejected": common + "\n\nAssistant: Ages."}])
    assert report.format == "hh_rlhf_transcript"
    assert ds[0]["prompt"] == [user("How do I cook rice?"), bot("Boil it."), user("How long?")]
    assert ds[0]["chosen"] == [bot("About 18 minutes.")] and ds[0]["rejected"] == [bot("Ages.")]


def test_parquet_dataset_and_datasetdict(tmp_path):
    Dataset.from_list([conv_row(), conv_row("Yo")]).to_parquet(str(tmp_path / "p.parquet"))
    ds, report = load_preference_pairs(tmp_path / "p.parquet")
    assert report.n_kept == 2 and ds["row"] == [0, 1] and ds[0]["source"] == "p.parquet"
    ds2, _ = load_preference_pairs(Dataset.from_list([conv_row()]))
    assert ds2[0]["source"] == "<dataset>" and ds2[0]["chosen"] == [bot("Hello!")]
    with pytest.raises(PreferenceDataError, match="pick one"):
        load_preference_pairs(DatasetDict(train=Dataset.from_list([conv_row()])))


# ---------------------------------------------------------------------------------------------
# Validation: each bad row names file, line and problem; skip_invalid counts it.

BAD_ROWS = {
    "missing key": ({"chosen": [user("Hi"), bot("x")]}, "missing key 'rejected'"),
    "wrong role order": ({"chosen": [bot("Hi"), bot("x")], "rejected": [bot("Hi"), bot("y")]},
                         "role 'assistant' where 'user' was expected"),
    "empty response": (conv_row(chosen="  \n"), "chosen response is empty"),
    "chosen identical to rejected": (conv_row(chosen="same", rejected="same"), "identical"),
    "prompt mismatch": ({"chosen": [user("Hi"), bot("x")], "rejected": [user("Hey"), bot("y")]},
                        "differ before their last message"),
    "invalid JSON": ('{"chosen": [', "invalid JSON"),
    "mixed formats": ({"chosen": "a b", "rejected": "a c"}, "all rows must share one format"),
}


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_bad_row_raises_or_is_skipped(tmp_path, reason):
    bad, problem = BAD_ROWS[reason]
    path = write_jsonl(tmp_path / "pairs.jsonl", [conv_row(), bad])
    with pytest.raises(PreferenceDataError) as err:
        load_preference_pairs(path)
    message = str(err.value)
    assert "pairs.jsonl" in message and "line 2" in message and problem in message
    assert err.value.reason == reason and err.value.row == 2
    ds, report = load_preference_pairs(path, skip_invalid=True)
    assert (report.n_read, report.n_kept, len(ds)) == (2, 1, 1)
    assert report.skipped == [(2, reason)] and report.counts_by_reason == {reason: 1}


def test_missing_prompt_in_explicit_data():
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"chosen": "q a", "rejected": "q b"}]
    with pytest.raises(PreferenceDataError, match=r"<list>, row 1: missing key 'prompt'"):
        load_preference_pairs(rows)


def test_empty_response_can_be_allowed():
    ds, _ = load_preference_pairs([conv_row(chosen="")], allow_empty_response=True)
    assert ds[0]["chosen"] == [bot("")]


def test_not_utf8(tmp_path):
    path = tmp_path / "pairs.jsonl"
    latin1 = json.dumps(conv_row("caf\xe9"), ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(conv_row()).encode() + b"\n" + latin1 + b"\n")
    with pytest.raises(PreferenceDataError, match=r"pairs.jsonl, line 2: byte 0xe9 .* UTF-8"):
        load_preference_pairs(path)
    _, report = load_preference_pairs(path, skip_invalid=True)
    assert report.n_kept == 1 and report.counts_by_reason == {"not UTF-8": 1}


def test_summary_counts_reasons(tmp_path):
    lines = [conv_row(), conv_row(chosen=""), "{oops", conv_row(rejected=" ")]
    path = write_jsonl(tmp_path / "pairs.jsonl", lines)
    _, report = load_preference_pairs(path, skip_invalid=True)
    assert report.summary() == ("read 4 rows from pairs.jsonl, kept 1, skipped 3 "
                                "(2 empty response, 1 invalid JSON)")


def test_file_level_errors(tmp_path):
    with pytest.raises(PreferenceDataError, match="no such file"):
        load_preference_pairs(tmp_path / "absent.jsonl")
    (tmp_path / "pairs.csv").write_text("chosen,rejected\n")
    with pytest.raises(PreferenceDataError, match="unknown extension '.csv'"):
        load_preference_pairs(tmp_path / "pairs.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PreferenceDataError, match="no valid preference pairs"):
        load_preference_pairs(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "bad.jsonl", ["{", conv_row(chosen="")])
    with pytest.raises(PreferenceDataError, match="no valid preference pairs"):
        load_preference_pairs(tmp_path / "bad.jsonl", skip_invalid=True)
    (tmp_path / "bad.json").write_text('[\n{"chosen": 1},\n')
    with pytest.raises(PreferenceDataError, match=r"bad.json, line 3: invalid JSON"):
        load_preference_pairs(tmp_path / "bad.json")


def test_embedded_pairs():
    ds, report = load_embedded_pairs()
    assert len(ds) == 2303 and report.format == "conversational_implicit" and not report.skipped
    assert ds[0]["prompt"][-1]["role"] == "user" and ds[0]["chosen"][0]["role"] == "assistant"


@pytest.mark.skipif(not SHARED_HH.is_dir(), reason="shared data mirror not present")
def test_raw_hh_rlhf_matches_embedded(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_bytes(gzip.decompress((SHARED_HH / "original/test.jsonl.gz").read_bytes()))
    raw, report = load_preference_pairs(path, skip_invalid=True, allow_empty_response=True)
    assert (report.n_read, report.n_kept) == (2312, 2303)
    embedded, _ = load_embedded_pairs()
    assert raw["chosen"] == embedded["chosen"] and raw["prompt"] == embedded["prompt"]


# ---------------------------------------------------------------------------------------------
# Split by prompt


def grouped_pairs():
    # 30 prompts with 1..4 pairs each (DSP-like repeats of one prompt).
    rows = [conv_row(f"q{i}", f"good {j}", f"bad {j}") for i in range(30) for j in range(1 + i % 4)]
    return load_preference_pairs(rows)[0]


def test_split_by_prompt_never_shares_a_prompt():
    ds = grouped_pairs()
    train, held, info = split_by_prompt(ds, eval_size=0.25, seed=3)
    train_prompts = {p[0]["content"] for p in train["prompt"]}
    eval_prompts = {p[0]["content"] for p in held["prompt"]}
    assert not train_prompts & eval_prompts and len(train_prompts | eval_prompts) == 30
    assert info["n_train_pairs"] + info["n_eval_pairs"] == len(ds) == len(train) + len(held)
    assert info["n_train_prompts"] == len(train_prompts)
    assert info["n_eval_prompts"] == len(eval_prompts)
    assert info["n_eval_pairs"] >= round(0.25 * len(ds)) and info["seed"] == 3


def test_split_is_deterministic_and_int_size_counts_pairs():
    ds = grouped_pairs()
    a = split_by_prompt(ds, eval_size=10, seed=1)
    b = split_by_prompt(ds, eval_size=10, seed=1)
    assert a[1]["row"] == b[1]["row"] and a[2] == b[2]
    assert 10 <= a[2]["n_eval_pairs"] <= 13  # whole groups of up to 4 pairs
    others = [split_by_prompt(ds, eval_size=10, seed=s)[1]["row"] for s in (2, 3, 4)]
    assert any(rows != a[1]["row"] for rows in others)
    with pytest.raises(ValueError):
        split_by_prompt(ds, eval_size=len(ds))
    subset = select_pairs(ds, 5, seed=0)
    assert len(subset) == 5 and subset["row"] == select_pairs(ds, 5, seed=0)["row"]


def test_flip_labels_swaps_a_seeded_fraction_of_texts_and_ids_together():
    ds = Dataset.from_dict({"prompt": [f"p{i}" for i in range(20)], "chosen": [f"c{i}" for i in range(20)],
                            "rejected": [f"r{i}" for i in range(20)],
                            "chosen_input_ids": [[i, 1] for i in range(20)], "rejected_input_ids": [[i, 2] for i in range(20)],
                            "row": list(range(20))})
    noisy, flipped = flip_labels(ds, 0.2, seed=5)
    assert len(flipped) == 4 and flipped == flip_labels(ds, 0.2, seed=5)[1] != flip_labels(ds, 0.2, seed=6)[1]
    assert noisy.column_names == ds.column_names
    for i in range(20):
        swapped = i in flipped
        assert noisy[i]["chosen"] == (f"r{i}" if swapped else f"c{i}")
        assert noisy[i]["rejected"] == (f"c{i}" if swapped else f"r{i}")
        assert noisy[i]["chosen_input_ids"] == [i, 2 if swapped else 1]
        assert noisy[i]["rejected_input_ids"] == [i, 1 if swapped else 2]
        assert noisy[i]["prompt"] == f"p{i}" and noisy[i]["row"] == i
    assert flip_labels(ds, 0.0)[1] == [] and len(flip_labels(ds, 1.0)[1]) == 20
    with pytest.raises(ValueError, match="fraction"):
        flip_labels(ds, 1.5)


# ---------------------------------------------------------------------------------------------
# Tokenization


def ids(tok, messages, **kwargs):
    return tok.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]


def test_conversational_ids_are_prompt_then_response_ending_with_eos(tok):
    prompt = [user("Hi"), bot("Hello"), user("Bye?")]
    out = tokenize_pair(prompt, [bot("Bye!")], [bot("No")], tok)
    p, c = out["prompt_input_ids"], out["chosen_input_ids"]
    full = ids(tok, prompt + [bot("Bye!")])
    assert p == ids(tok, prompt, add_generation_prompt=True) and full[: len(p)] == p
    assert c[-1] == tok.eos_token_id and full[: len(p + c)] == p + c
    assert tok.decode(full[len(p + c):]) == "\n"  # ChatML's newline after eos is dropped
    assert tok.decode(c) == "Bye!<|im_end|>"
    assert tok.decode(out["rejected_input_ids"]) == "No<|im_end|>"


def test_standard_ids_follow_trl(tok):
    out = tokenize_pair("2+2=", "4", "five", tok)
    assert out["prompt_input_ids"] == tok("2+2=")["input_ids"]
    four = tok("4", add_special_tokens=False)["input_ids"]
    assert out["chosen_input_ids"] == four + [tok.eos_token_id]
    assert out["rejected_input_ids"][-1] == tok.eos_token_id


def test_truncation_cuts_prompt_from_left_and_keeps_response(tok):
    long_prompt = [user("x" * 100 + "END")]
    untruncated = tokenize_pair(long_prompt, [bot("ok")], [bot("fine")], tok, max_length=10_000)
    out = tokenize_pair(long_prompt, [bot("ok")], [bot("fine")], tok, max_length=40)
    p, r = out["prompt_input_ids"], out["rejected_input_ids"]
    assert p == untruncated["prompt_input_ids"][-len(p):] and len(p) + len(r) == 40
    assert tok.decode(r) == "fine<|im_end|>"
    assert out["prompt_truncated"] and not out["response_truncated"]
    out = tokenize_pair(long_prompt, [bot("ok")], [bot("n")], tok, max_prompt_length=20)
    assert len(out["prompt_input_ids"]) == 20
    # A response longer than max_length: prompt keeps max_length // 4 tokens, response cut right.
    out = tokenize_pair(long_prompt, [bot("y" * 100)], [bot("n")], tok, max_length=40)
    assert len(out["prompt_input_ids"]) == 10 and len(out["chosen_input_ids"]) == 30
    assert out["rejected_input_ids"][-1] == tok.eos_token_id and out["response_truncated"]


def test_tokenize_pairs_reports_counts(tok):
    rows = [conv_row("x" * 60), conv_row("short", chosen="y" * 60), conv_row()]
    out, report = tokenize_pairs(load_preference_pairs(rows)[0], tok, max_length=48)
    assert out.column_names == ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                                "untruncated_length", "row", "source"]
    assert out["row"] == [0, 1, 2] and report.n_pairs == 3
    assert out["untruncated_length"][0] > 48 and out["untruncated_length"][2] <= 48
    assert (report.n_prompt_truncated, report.n_response_truncated) == (2, 1)
    assert report.n_prompt_not_prefix == 0
    for p, c in zip(out["prompt_input_ids"], out["chosen_input_ids"]):
        assert len(p) + len(c) <= 48
    assert "2 prompts cut from the left" in report.summary()



def test_tokenize_pairs_drops_longer_pairs_before_counting_and_before_the_prompt_room_check(tok):
    """drop_longer_than N leaves out (and counts) every pair longer than N tokens, untruncated: the
    kept pairs come back in order with their input indices, the truncation counts cover them only,
    and the refusal of a max_length that cuts prompts away looks at them only (two of three pairs
    have a 60-character response, which alone fills max_length 48)."""
    rows = [conv_row("short", chosen="y" * 60), conv_row(), conv_row("hey", rejected="z" * 60)]
    pairs = load_preference_pairs(rows)[0]
    with pytest.raises(ConfigError, match="leaves no room for the prompt of 2 of 3 pairs"):
        tokenize_pairs(pairs, tok, max_length=48)
    # dropping at 64 (> max_length) keeps nothing that would be cut: no refusal, nothing truncated
    out, report = tokenize_pairs(pairs, tok, max_length=48, drop_longer_than=64)
    assert report.kept == [1] and out["row"] == [1] and len(out) == 1
    assert (report.n_pairs, report.n_dropped, report.n_no_room_for_prompt, report.n_response_truncated) == (1, 2, 0, 0)
    assert "2 pairs longer than 64 tokens dropped" in report.summary()
    assert report.longest_pair == out["untruncated_length"][0] <= 64
    # dropping above every pair keeps them all, in order, counted as before
    out, report = tokenize_pairs(pairs, tok, max_length=48, drop_longer_than=10_000, max_prompt_cut_share=None)
    assert report.kept == [0, 1, 2] and report.n_dropped == 0 and report.n_response_truncated == 2
    with pytest.raises(ConfigError, match="drop_longer_than"):
        tokenize_pairs(pairs, tok, max_length=48, drop_longer_than=True)

def test_template_that_rewrites_the_prompt_is_counted_and_warned():
    tok = make_tokenizer(REWRITING)
    ds, _ = load_preference_pairs([conv_row(), conv_row("Yo")])
    with pytest.warns(UserWarning, match="not a prefix"):
        out, report = tokenize_pairs(ds, tok)
    assert report.n_prompt_not_prefix == 2
    p, c = out[0]["prompt_input_ids"], out[0]["chosen_input_ids"]
    assert tok.decode(p) == "<|im_start|>user\n"  # the common prefix is the boundary
    assert tok.decode(c) == "Hi<|im_end|>\n<|im_start|>assistant\n*Hello!<|im_end|>"
