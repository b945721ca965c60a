"""End-to-end on the real embedded default model (SmolLM2-135M-Instruct), as a new user runs it."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("gguf")
try:
    from qadapter.embedded import gguf_path
    gguf_path()
except RuntimeError as exc:  # pragma: no cover - the install script always installs it
    pytest.skip(str(exc), allow_module_level=True)

pytestmark = pytest.mark.slow


def qadapter_cli(*args, timeout=900):
    done = subprocess.run([sys.executable, "-m", "qadapter.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_cli_train_then_generate_on_the_embedded_default(tmp_path):
    out = qadapter_cli("train", "--max-steps", "2", "--eval-pairs", "6", "--train-eval-pairs", "4",
                       "--show-examples", "1", "--example-new-tokens", "6", "--output-dir", str(tmp_path / "run"))
    assert "preference accuracy" in out
    assert "train " in out and "held_out" in out and "base:" in out and "customized:" in out
    adapter = tmp_path / "run" / "adapter"
    assert f"adapter saved to {adapter.resolve()}" in out
    report = json.loads((adapter / "report.json").read_text())
    assert report["steps"] == 2 and report["accuracy"]["held_out"]["base"]["n"] == 6
    assert json.loads((adapter / "qadapter_config.json").read_text())["base_model_name_or_path"] == "SmolLM2-135M-Instruct"

    answer = qadapter_cli("generate", "--adapter", str(adapter), "--max-new-tokens", "5", "--compare", "What is 2+2?")
    assert answer.strip()
