"""`qadapter export`: a plain PEFT LoRA folder whose plain `generate()` samples the customized policy.
Exact cases (a residual adapter at strength 1; a stack at all strengths 1 = one LoRA of rank Σr) are
checked to 1e-5 in the logits and token for token in greedy decoding; a distilled export's held-out
KL is reported and bounded."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_tokenizer, randomize_lora, tiny_llama
from qadapter.export import export
from qadapter.modeling import QAdapter
from qadapter.settings import QAdapterSettings
from qadapter.backbone import causal_lm_logits, lora_config
from qadapter.stack import QAdapterStack, merge_into, save_extended


def _lora(r):
    return lora_config(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture
def setup(tmp_path):
    tok = make_tiny_tokenizer()
    base = tiny_llama()
    first = QAdapter.create(copy.deepcopy(base), tok, QAdapterSettings(), peft_config=_lora(4))
    randomize_lora(first.model, seed=1, scale=0.3)
    first.save_pretrained(tmp_path / "a1")
    merged, _ = merge_into(copy.deepcopy(base), tmp_path / "a1")
    # the second adapter targets other modules, so concatenation needs zero blocks
    second = QAdapter.create(merged, tok, QAdapterSettings(),
                             peft_config=lora_config(r=2, lora_alpha=3, lora_dropout=0.0, target_modules=("v_proj", "o_proj")))
    randomize_lora(second.model, seed=2, scale=0.3)
    save_extended(tmp_path / "stack", tmp_path / "a1", second.save_pretrained, tok)
    return dict(tok=tok, base=base, first=first, dir1=tmp_path / "a1", stack=tmp_path / "stack", tmp=tmp_path)


def _plain(setup, folder):
    """The export as plain PEFT would load it: nothing of qadapter involved."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(setup["base"]), str(folder)).eval()


IDS = torch.tensor([[0, 0, 3, 6, 7, 8, 9], [3, 5, 9, 11, 12, 13, 14]])
MASK = (IDS != 0).long()


def _plain_greedy(model, prompt, n):
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def test_residual_adapter_at_strength_one_exports_a_copy(setup):
    report = export(setup["dir1"], setup["tmp"] / "out1")
    assert report["exact"] and report["kind"] == "copy"
    plain = _plain(setup, setup["tmp"] / "out1")
    qa = QAdapter.from_pretrained(setup["dir1"], base_model=copy.deepcopy(setup["base"]), tokenizer=setup["tok"])
    want = F.log_softmax(qa.logits(IDS, MASK), -1)
    got = F.log_softmax(causal_lm_logits(plain, IDS, MASK).float(), -1)
    assert (got - want)[MASK.bool()].abs().max().item() < 1e-5
    for prompt in ([5, 6, 7], [3, 9, 10, 11]):
        want_ids = qa.generate([prompt], max_new_tokens=6, return_ids=True, eos_token_id=[])[1][0]
        assert _plain_greedy(plain, prompt, 6) == want_ids


def test_stack_at_strength_one_exports_one_lora_of_summed_rank(setup):
    report = export(setup["stack"], setup["tmp"] / "out2")
    assert report["exact"] and report["kind"] == "concatenated" and report["rank"] == 4 + 2
    cfg = json.loads((setup["tmp"] / "out2" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and sorted(cfg["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    plain = _plain(setup, setup["tmp"] / "out2")
    stack = QAdapterStack.from_pretrained(setup["stack"], base_model=copy.deepcopy(setup["base"]), tokenizer=setup["tok"])
    want = F.log_softmax(stack.logits(IDS, MASK), -1)
    got = F.log_softmax(causal_lm_logits(plain, IDS, MASK).float(), -1)
    assert (got - want)[MASK.bool()].abs().max().item() < 1e-5
    for prompt in ([5, 6, 7], [3, 9, 10, 11]):
        want_ids = stack.generate([prompt], max_new_tokens=6, return_ids=True, eos_token_id=[])[1][0]
        assert _plain_greedy(plain, prompt, 6) == want_ids


def test_other_strengths_are_not_exact_and_need_data(setup):
    with pytest.raises(ValueError, match="distillation needs data"):
        export(setup["dir1"], setup["tmp"] / "out3", strengths=2.0)


#: the stated bound: on this tiny model, distillation must cut the held-out KL(π̃ ‖ export) of its
#: start (the strength-1 export) by at least 10% and end below 0.05 nats per token
KL_BOUND = 0.05


def test_distilled_export_reports_held_out_kl_below_the_bound(setup):
    pairs = setup["tmp"] / "pairs.jsonl"
    rows = [{"chosen": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}, {"role": "assistant", "content": "w4 w5"}],
             "rejected": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}, {"role": "assistant", "content": "w7"}]}
            for i in range(10, 30)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = export(setup["dir1"], setup["tmp"] / "out4", strengths=2.5, data=str(pairs),
                    base_model=copy.deepcopy(setup["base"]), steps=20, lr=3e-2, batch_size=8, max_new_tokens=8,
                    samples_per_prompt=2, log=lambda *a: None)
    assert report["kind"] == "distilled" and not report["exact"]
    before, after = report["held_out_kl_teacher_to_strength1_export"], report["held_out_kl_teacher_to_export"]
    print(f"distilled export: held-out KL(π̃‖export) {before:.4f} → {after:.4f} nats/token")
    assert before > 0 and after < 0.9 * before and after < KL_BOUND
    assert "margin_accuracy_export" in report and "margin_accuracy_original" in report
    info = json.loads((setup["tmp"] / "out4" / "qadapter_export.json").read_text())
    assert info["held_out_kl_teacher_to_export"] == after
    _plain(setup, setup["tmp"] / "out4")  # loads as a plain PEFT folder
