"""Run under `accelerate launch --num_processes 2 --cpu`: trains a tiny model with QAdapterTrainer and
saves each rank's adapter weights, so the test can check the ranks ended identical."""

import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_tokenizer, tiny_llama  # noqa: E402
from test_trainer import PAIRS  # noqa: E402

from qadapter.trainer import QAdapterConfig, QAdapterTrainer  # noqa: E402

out = Path(sys.argv[1])
args = QAdapterConfig(output_dir=str(out / "run"), max_steps=3, per_device_train_batch_size=1, learning_rate=1e-2,
                      logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=3,
                      ddp_backend="gloo")
trainer = QAdapterTrainer(tiny_llama(seed=0), args, train_dataset=Dataset.from_list(PAIRS * 4),
                          processing_class=make_tiny_tokenizer())
trainer.train()
rank = trainer.args.process_index
state = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters() if p.requires_grad}
torch.save({"state": state, "world_size": trainer.args.world_size, "steps": trainer.state.global_step}, out / f"rank{rank}.pt")
