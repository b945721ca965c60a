"""QAdapterTrainer runs unchanged under `accelerate launch` (2 CPU processes, DDP over gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import torch


def test_two_process_accelerate_launch_ends_with_identical_adapters(tmp_path):
    script = Path(__file__).parent / "scripts" / "ddp_train.py"
    # `--multi_gpu` selects accelerate's torchrun launcher (its `--cpu` multi-process path needs
    # mpirun); the script's `use_cpu=True` then makes each rank a CPU process talking over gloo.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["steps"] == 3 for r in ranks)
    assert ranks[0]["state"], "no trainable parameters were saved"
    for name, weight in ranks[0]["state"].items():
        torch.testing.assert_close(weight, ranks[1]["state"][name], rtol=0, atol=0, msg=name)
    assert any(("lora_B" in n) and weight.abs().sum() > 0 for n, weight in ranks[0]["state"].items()), \
        "the adapter did not train (lora_B still zero)"
