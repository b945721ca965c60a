"""What a comparison keeps between runs: fingerprints of its settings, methods and judges, and
cached results that are reused only while their key matches.
"""

from __future__ import annotations

import enum
import hashlib
from pathlib import Path
from typing import Any

from ...io import sha256_files


#: QAdapterConfig / JobArguments fields that change what a method learns: a resumed comparison must
#: use the same values (they are recorded in OUT/comparison.json)
TRAINING_CONFIG_FIELDS = ("seed", "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay",
                          "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                          "max_length", "max_prompt_length", "lora_r", "lora_alpha", "lora_dropout",
                          "lora_target_modules", "alpha_0", "alpha_tilde", "beta", "gamma", "normalizer",
                          "reference_compat", "parameterization", "value_pairing", "bf16", "fp16")


TRAINING_JOB_FIELDS = ("model", "on", "data", "eval_pairs", "train_pairs", "label_noise", "drop_longer_than", "max_train_minutes",
                       "skip_invalid", "allow_empty_response", "dpo_beta", "kl_weight")


def jsonable(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, set):
        return sorted(jsonable(v) for v in value)
    return value


def adapter_fingerprint(folder: Path) -> str:
    """Content hash of an adapter folder's weights and configs (small files: a LoRA adapter)."""
    files = [p for p in folder.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in
             ("adapter_config.json", "qadapter_config.json"))]
    return sha256_files(files)


def folder_stamp(folder: Path) -> str:
    """Names, sizes and modification times of a (possibly large) model folder: cheap and changes on retraining."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- the comparison
def training_fingerprint(job, config) -> dict[str, Any]:
    fp = {f"job.{k}": jsonable(getattr(job, k, None)) for k in TRAINING_JOB_FIELDS}
    fp.update({k: jsonable(getattr(config, k, None)) for k in TRAINING_CONFIG_FIELDS})
    return fp


def method_done(folder: Path) -> bool:
    return ((folder / "adapter" / "report.json").is_file() and (folder / "split" / "train.jsonl").is_file()
            and (folder / "split" / "held_out.jsonl").is_file())
