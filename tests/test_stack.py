"""Stacked Q-Adapters on a tiny random model: the stack equals the two-level composition computed by
hand (logits, both decoding engines), saves and loads, refuses a different base, and training "on"
an adapter trains on exactly the earlier customized policy (the merged network)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_tokenizer, randomize_lora, tiny_llama
from qadapter.modeling import QAdapter
from qadapter.settings import QAdapterSettings
from qadapter.backbone import causal_lm_logits, lora_config
from qadapter.stack import (STACK_CONFIG, QAdapterStack, StackFastEngine, StackReferenceEngine, merge_into,
                            read_stack, save_extended, stack_logits)

torch.set_default_dtype(torch.float32)


def _lora(r=4):
    return lora_config(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=("q_proj", "v_proj"))


def _adapter_on(model, tok, seed, r=4):
    qa = QAdapter.create(model, tok, QAdapterSettings(), peft_config=_lora(r))
    randomize_lora(qa.model, seed=seed, scale=0.3)
    return qa


@pytest.fixture
def two_level(tmp_path):
    """A stack of two residual adapters (adapter 2 trained on base + adapter 1, merged), plus the
    three networks of the hand computation built independently of the stack code."""
    tok = make_tiny_tokenizer()
    base = tiny_llama()
    first = _adapter_on(copy.deepcopy(base), tok, seed=1)
    first.save_pretrained(tmp_path / "a1")
    merged = copy.deepcopy(base)
    with torch.no_grad():  # merge by hand: W + B·A·scaling for every LoRA layer
        for name, module in first.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                target = merged.get_submodule(name.replace("base_model.model.", ""))
                target.weight += (module.lora_B["default"].weight @ module.lora_A["default"].weight) * module.scaling["default"]
    second = _adapter_on(merged, tok, seed=2, r=2)
    save_extended(tmp_path / "stack", tmp_path / "a1", second.save_pretrained, tok)
    return dict(tok=tok, base=base, first=first, second=second, dir=tmp_path / "stack", tmp=tmp_path)


def _hand(two_level, ids, mask, strengths):
    """log π = log softmax(z0) + s1·(z1 − z0) + s2·(z2 − z1), each z from its own network."""
    with torch.no_grad():
        z0 = causal_lm_logits(two_level["base"], ids, mask).float()
        z1 = causal_lm_logits(two_level["first"].model, ids, mask).float()
        z2 = causal_lm_logits(two_level["second"].model, ids, mask).float()
    s1, s2 = strengths
    return F.log_softmax(F.log_softmax(z0, -1) + s1 * (z1 - z0) + s2 * (z2 - z1), -1)


def _batch():
    ids = torch.tensor([[0, 0, 3, 6, 7, 8, 9], [3, 5, 9, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    return ids, mask


def _load(two_level, **kw):
    return QAdapterStack.from_pretrained(two_level["dir"], base_model=copy.deepcopy(two_level["base"]),
                                         tokenizer=two_level["tok"], **kw)


@pytest.mark.parametrize("strengths", [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_stack_equals_two_level_composition_by_hand(two_level, strengths):
    stack = _load(two_level)
    ids, mask = _batch()
    got = F.log_softmax(stack.logits(ids, mask, strengths=list(strengths)), -1)
    want = _hand(two_level, ids, mask, strengths)
    real = mask.bool()
    assert (got - want)[real].abs().max().item() < 1e-5
    # and the composition is not trivially the base: adapters really move the policy
    base = F.log_softmax(causal_lm_logits(two_level["base"], ids, mask).float(), -1)
    assert (got - base)[real].abs().max().item() > 1e-2 or strengths == (0.0, 0.0)


def test_stack_logits_function_telescopes():
    z = [torch.randn(3, 11) for _ in range(4)]
    at_one = stack_logits(z, [1.0, 1.0, 1.0])
    assert torch.allclose(F.log_softmax(at_one, -1), F.log_softmax(z[-1], -1), atol=1e-6)
    at_zero = stack_logits(z, [0.0, 0.0, 0.0])
    assert torch.allclose(F.log_softmax(at_zero, -1), F.log_softmax(z[0], -1), atol=1e-6)


@pytest.mark.parametrize("engine", [StackFastEngine, StackReferenceEngine])
@pytest.mark.parametrize("strengths", [(1.0, 1.0), (0.5, 2.0)])
def test_decoding_engines_match_hand_composition(two_level, engine, strengths):
    """Every step's next-token logits of both engines (fast: all k+1 branches in one forward) equal
    the hand composition recomputed on the whole sequence, to 1e-6 after log-softmax."""
    stack = _load(two_level)
    ids, mask = _batch()
    steps = 5
    eng = engine(stack, "customized", list(strengths), ids.shape[0])
    seq, full_mask = ids.clone(), mask.clone()
    try:
        with torch.inference_mode():
            logits = eng.prefill(ids, mask, ids.shape[1] + steps)
            for _ in range(steps):
                want = _hand(two_level, seq, full_mask, strengths)[:, -1]
                assert (F.log_softmax(logits, -1) - want).abs().max().item() < 1e-6
                tokens = logits.argmax(-1)
                seq = torch.cat([seq, tokens[:, None]], 1)
                full_mask = torch.cat([full_mask, torch.ones_like(tokens[:, None])], 1)
                logits = eng.step(tokens)
    finally:
        eng.close()


def test_generate_fast_reference_and_hand_greedy_agree(two_level):
    stack = _load(two_level, strengths=[0.7, 1.5])
    prompts = [[5, 6, 7], [3, 9, 10, 11, 12]]
    fast = stack.generate(prompts, max_new_tokens=6, return_ids=True, eos_token_id=[])[1]
    ref = stack.generate(prompts, max_new_tokens=6, return_ids=True, eos_token_id=[], fast=False)[1]
    assert fast == ref
    for prompt, got in zip(prompts, fast):  # a cache-free greedy loop over the hand composition
        seq = torch.tensor([prompt])
        for token in got:
            nxt = _hand(two_level, seq, torch.ones_like(seq), (0.7, 1.5))[0, -1].argmax().item()
            assert nxt == token
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    with pytest.raises(ValueError, match="does not apply to a stack"):
        stack.generate(prompts, alpha_0=1.0, max_new_tokens=2)


def test_save_load_identical_logits(two_level, tmp_path):
    stack = _load(two_level, strengths=[0.5, 2.0])
    ids, mask = _batch()
    before = stack.logits(ids, mask)
    stack.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / STACK_CONFIG).read_text())
    assert meta["adapters"] == ["01", "02"] and meta["base_fingerprint"] == two_level["first"].settings.base_fingerprint
    for name in meta["adapters"]:  # each adapter is a PEFT folder with its settings
        assert (tmp_path / "saved" / name / "adapter_config.json").is_file()
        assert (tmp_path / "saved" / name / "qadapter_config.json").is_file()
    again = QAdapterStack.from_pretrained(tmp_path / "saved", base_model=copy.deepcopy(two_level["base"]),
                                          tokenizer=two_level["tok"], strengths=[0.5, 2.0])
    assert torch.equal(again.logits(ids, mask), before)
    assert torch.equal(again.logits(ids, mask, strengths=[1.0, 1.0]), stack.logits(ids, mask, strengths=[1.0, 1.0]))


def test_a_different_base_is_refused(two_level):
    with pytest.raises(ValueError, match="refusing to load the stack"):
        QAdapterStack.from_pretrained(two_level["dir"], base_model=tiny_llama(seed=5), tokenizer=two_level["tok"])
    with pytest.raises(ValueError, match="refusing to load the stack"):
        merge_into(tiny_llama(seed=5), two_level["dir"])


def test_merged_network_is_the_stack_policy_at_strength_one(two_level):
    """What `--on` trains against: π1 of the next adapter = softmax(z_merged) = the stack's policy."""
    stack = _load(two_level)
    merged, spec = merge_into(copy.deepcopy(two_level["base"]), two_level["dir"])
    assert len(spec.folders) == 2
    ids, mask = _batch()
    got = F.log_softmax(causal_lm_logits(merged, ids, mask).float(), -1)
    want = F.log_softmax(stack.logits(ids, mask), -1)
    assert (got - want)[mask.bool()].abs().max().item() < 1e-5


def test_stacking_refuses_untied_or_full_adapters(tmp_path):
    tok = make_tiny_tokenizer()
    qa = QAdapter.create(tiny_llama(), tok, QAdapterSettings(parameterization="full"), peft_config=_lora())
    qa.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="cannot be stacked"):
        merge_into(tiny_llama(), tmp_path / "full")
    assert read_stack(tmp_path / "full").folders == [tmp_path / "full"]


def test_run_training_on_an_adapter_saves_a_stack(two_level, tmp_path):
    """`qadapter train --on DIR` (the Python API's JobArguments.on): trains the next level on the
    merged network and saves the earlier adapters plus the new one as one stack folder."""
    from qadapter.evaluation import load_policy
    from qadapter.recipes.config import JobArguments
    from qadapter.recipes.train import run_training
    from qadapter.trainer import QAdapterConfig

    model_dir = tmp_path / "tiny-model"
    two_level["base"].save_pretrained(model_dir)
    two_level["tok"].save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"chosen": [{"role": "user", "content": f"w{i} w2"}, {"role": "assistant", "content": "w4 w5"}],
                                         "rejected": [{"role": "user", "content": f"w{i} w2"}, {"role": "assistant", "content": "w7"}]}) + "\n"
                             for i in range(8)), encoding="utf-8")
    job = JobArguments(model=str(model_dir), data=str(pairs), on=str(two_level["dir"]), eval_pairs=2,
                       train_eval_pairs=0, measure_held_out=False, show_examples=0)
    config = QAdapterConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                            learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True, lora_dropout=0.0)
    report = run_training(job, config, log=lambda *a: None)
    folder = tmp_path / "run" / "adapter"
    spec = read_stack(folder)
    assert len(spec.folders) == 3 and spec.base_fingerprint == two_level["first"].settings.base_fingerprint
    policy = load_policy(folder, base_model=str(model_dir))
    assert isinstance(policy, QAdapterStack) and len(policy) == 3
    assert report["steps"] == 2
    # the third adapter's π1 was the two-adapter stack: its recorded training base is their merge
    merged, _ = merge_into(copy.deepcopy(two_level["base"]), two_level["dir"])
    from qadapter.backbone import base_fingerprint
    assert spec.settings[2].base_fingerprint == base_fingerprint(merged)
