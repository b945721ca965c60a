"""What vLLM's `--enable-lora` needs of `qadapter export`, checked without vLLM (CI): the folder is
a plain PEFT LoRA (LORA type, no DoRA / modules_to_save / bias, A and B tensors named as PEFT saves
them, the rank vLLM's --max-lora-rank must cover), and merging it into the base weights, as vLLM's
LoRA kernels compute x·W + x·A·B·scaling, gives qadapter's policy at strength 1 to 1e-5. The
launcher's command line is checked against the folder. The end-to-end run in vLLM itself is
tests/test_vllm.py (marked `vllm`)."""

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import make_tiny_tokenizer, randomize_lora, tiny_llama
from qadapter.backbone import causal_lm_logits, lora_config
from qadapter.export import export
from qadapter.modeling import QAdapter
from qadapter.settings import QAdapterSettings
from qadapter.vllm.launch import max_lora_rank, vllm_command

IDS = torch.tensor([[0, 0, 3, 6, 7, 8, 9], [3, 5, 9, 11, 12, 13, 14]])
MASK = (IDS != 0).long()


@pytest.fixture
def exported(tmp_path):
    tok = make_tiny_tokenizer()
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    qa = QAdapter.create(copy.deepcopy(base), tok, QAdapterSettings(base_model_name_or_path=str(tmp_path / "base")),
                         peft_config=lora_config(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    randomize_lora(qa.model, seed=3, scale=0.3)
    qa.save_pretrained(tmp_path / "adapter")
    export(tmp_path / "adapter", tmp_path / "export")
    return dict(base=base, tok=tok, qa=qa, dir=tmp_path / "export", tmp=tmp_path)


def test_export_is_a_plain_lora_vllm_loads(exported):
    cfg = json.loads((exported["dir"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert not cfg.get("use_dora") and not cfg.get("modules_to_save") and cfg.get("bias", "none") == "none"
    weights = load_file(str(exported["dir"] / "adapter_model.safetensors"))
    modules = {k.rsplit(".lora_", 1)[0] for k in weights}
    assert len(modules) == 2 * 4  # 2 layers x q, k, v, o
    for m in modules:  # vLLM maps 'base_model.model.<module>.lora_{A,B}.weight' onto its own layers
        assert m.startswith("base_model.model.model.layers.")
        a, b = weights[m + ".lora_A.weight"], weights[m + ".lora_B.weight"]
        assert a.shape[0] == 4 and b.shape[1] == 4 and b.abs().max() > 0


def test_merged_export_equals_qadapter_at_strength_one(exported):
    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(exported["base"]), str(exported["dir"])).merge_and_unload().eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        want = F.log_softmax(exported["qa"].logits(IDS, MASK, strength=1.0), -1)
        got = F.log_softmax(causal_lm_logits(merged, IDS, MASK).float(), -1)
        base = F.log_softmax(causal_lm_logits(exported["base"], IDS, MASK).float(), -1)
    assert (got - want)[MASK.bool()].abs().max().item() < 1e-5
    assert (base - want)[MASK.bool()].abs().max().item() > 1e-2  # the adapter really changes the policy


def test_launcher_commands(exported):
    assert max_lora_rank(exported["dir"]) == 8  # vLLM's smallest allowed rank >= 4
    cmd = vllm_command(exported["dir"], name="acad", port=8123)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == str(exported["tmp"] / "base")
    assert cmd[cmd.index("--lora-modules") + 1] == f"acad={exported['dir'].resolve()}"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8" and "--enable-lora" in cmd
    two = vllm_command(exported["dir"], name="acad", also=[("x2", exported["dir"])])
    i = two.index("--lora-modules")  # one flag: vLLM keeps only the last --lora-modules
    assert two[i + 1:i + 3] == [f"acad={exported['dir'].resolve()}", f"x2={exported['dir'].resolve()}"]
    assert two.count("--lora-modules") == 1 and two[two.index("--max-loras") + 1] == "2"
    plugin = vllm_command(exported["tmp"] / "adapter", name="acad", plugin=True)
    overrides = json.loads(plugin[plugin.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["QAdapterForCausalLM"],
                         "qadapter_adapter": str((exported["tmp"] / "adapter").resolve())}
    assert "--enable-lora" not in plugin and plugin[plugin.index("--served-model-name") + 1] == "acad"
    (exported["tmp"] / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no adapter_config.json"):
        vllm_command(exported["tmp"] / "empty", name="x")
