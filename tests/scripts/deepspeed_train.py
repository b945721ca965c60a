"""Train a tiny model with QAdapterTrainer and save the adapter through the Trainer's own save path.

`python deepspeed_train.py MODEL_DIR OUT [bf16]` runs one process with 2 pairs per step; under
`accelerate launch --config_file configs/accelerate/deepspeed_zero{2,3}.yaml --num_processes 2`
each of the two ranks takes 1 pair per step, so both runs see the same pairs per optimizer step and
must end with the same adapter. The model is loaded from MODEL_DIR after the training arguments
exist, so under ZeRO-3 (zero3_init_flag) it is partitioned as it loads: the base fingerprint and
the saved adapter must come from gathered weights.
"""

import json
import os
import sys
from pathlib import Path

from datasets import Dataset
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_trainer import PAIRS  # noqa: E402

from qadapter.embedded import load_tokenizer  # noqa: E402
from qadapter.trainer import QAdapterConfig, QAdapterTrainer  # noqa: E402

model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
bf16 = sys.argv[3:] == ["bf16"]  # what the config files' `mixed_precision: bf16` asks the Trainer for
world = int(os.environ.get("WORLD_SIZE", "1"))  # set by the launcher
args = QAdapterConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=2 // world,
                      learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                      seed=3, lora_dropout=0.0, train_sampling_strategy="sequential", bf16=bf16, ddp_backend="gloo" if world > 1 else None)
set_seed(args.seed)  # the LoRA initialization draws from the global generator, before the Trainer seeds it
trainer = QAdapterTrainer(str(model_dir), args, train_dataset=Dataset.from_list(PAIRS * 4),
                          processing_class=load_tokenizer(model_dir))
trainer.train()
trainer.save_model(str(out / "adapter"))
if trainer.args.should_save:
    (out / "run.json").write_text(json.dumps({"world_size": trainer.args.world_size,
                                              "steps": trainer.state.global_step,
                                              "fingerprint": trainer.settings.base_fingerprint,
                                              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}))
# an explicit, collective shutdown: a rank that exits while the other still holds the process group
# (and DeepSpeed's shared-memory communication op) can abort at exit ("terminate called without an
# active exception", seen once in CI on ZeRO-3) and take the launch down with it
import torch.distributed as dist  # noqa: E402

if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
    # and no interpreter teardown: the abort above came from a C++ thread object destroyed at exit,
    # after every file this script writes was written (checked by the test); skip that teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
