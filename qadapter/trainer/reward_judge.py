"""A reward model trained on the training pairs: the judge of a comparison's win rate.
"""

from __future__ import annotations

from pathlib import Path
import time
from typing import Any, Callable, Sequence


# --------------------------------------------------------------------------- the judge
def train_reward_judge(model: str, train_pairs: Sequence[dict], output_dir: str | Path, *, max_steps: int = 100,
                       learning_rate: float = 5e-5, batch_size: int = 8, max_length: int = 512, seed: int = 0,
                       use_cpu: bool = False, bf16: bool = False, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train a reward model on preference pairs with TRL's ``RewardTrainer``: the base model ``model``
    with a one-logit classification head (``AutoModelForSequenceClassification``, every weight
    trained), ``max_steps`` steps of ``batch_size`` pairs. Saves it with its tokenizer and
    ``judge_report.json`` to ``output_dir`` (atomically) and returns the report. ``bf16``: bf16
    autocast, as the policies' training asks for it; said explicitly because TRL's RewardConfig
    defaults to bf16, which on a CPU without native bf16 matrix units (AVX2 only) runs its matrix
    products several times slower than float32."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from ..embedded import load_tokenizer, resolve_model_path
    from ..io import save_atomically, write_json

    output_dir = Path(output_dir)
    model_path = resolve_model_path(model)
    tokenizer = load_tokenizer(model_path, pad_with_eos=True)
    torch.manual_seed(seed)
    rm = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_pairs]
    args = RewardConfig(output_dir=str(output_dir.with_name(output_dir.name + ".work")), max_steps=max_steps,
                        per_device_train_batch_size=batch_size, learning_rate=learning_rate, max_length=max_length,
                        seed=seed, report_to=[], save_strategy="no", logging_steps=max(1, max_steps // 10),
                        use_cpu=use_cpu, bf16=bf16, lr_scheduler_type="linear", warmup_steps=0)
    log(f"judge: training a reward model from {model} on {len(rows)} training pairs ({max_steps} steps of "
        f"{batch_size} pairs, learning rate {learning_rate:g}) with TRL's RewardTrainer")
    started = time.monotonic()
    trainer = RewardTrainer(rm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    report = {"base_model": model, "train_pairs": len(rows), "steps": trainer.state.global_step,
              "max_steps": max_steps, "batch_size": batch_size, "learning_rate": learning_rate,
              "max_length": max_length, "seed": seed, "bf16": bf16,
              "train_seconds": round(time.monotonic() - started, 1),
              "trainer": "trl.RewardTrainer"}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        report["final_loss"] = losses[-1]

    def write(tmp):
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_json(Path(tmp) / "judge_report.json", report)

    save_atomically(output_dir, write)
    import shutil

    shutil.rmtree(args.output_dir, ignore_errors=True)
    return report
