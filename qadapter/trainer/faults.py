"""Faults during training, kept out of the training step: checksummed checkpoints, the rows of each
batch, and a stop on a non-finite loss (with the step and the rows) before anything is saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..integrity import NonFiniteError, write_manifest

ROWS_KEY = "qadapter_rows"


class ChecksumCheckpoints(TrainerCallback):
    """After each checkpoint is written, record its files' sizes and SHA-256 (qadapter_checksums.json),
    so that resuming detects a truncated or corrupted file; a checkpoint without it was cut short."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_manifest(folder)


class WithRows:
    """Wraps a collator: the batch also carries each pair's source and row (``qadapter_rows``), so a
    failure can name the rows it happened on. The step itself ignores the key."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]):
        batch = self.collator(features)
        if features and "row" in features[0]:
            batch[ROWS_KEY] = [(f.get("source"), f.get("row")) for f in features]
        return batch


def describe_rows(rows) -> str:
    if not rows:
        return "(unknown: the dataset has no 'row' column)"
    by_source: dict[Any, list[str]] = {}
    for source, row in rows:
        by_source.setdefault(source, []).append(str(row))
    return "; ".join(f"{source or '<dataset>'} rows {', '.join(r)}" for source, r in by_source.items())


def check_loss(loss: torch.Tensor, inputs: dict, state) -> None:
    """Raise :class:`NonFiniteError` (step number, the batch's rows) when ``loss`` is NaN or inf."""
    if bool(torch.isfinite(loss.detach()).all()):
        return
    value = loss.detach().float().reshape(-1)[0].item()
    raise NonFiniteError(
        f"training stopped: the loss is {value} at step {state.global_step + 1} (epoch {state.epoch or 0:.2f}) "
        f"on the batch of {describe_rows(inputs.get(ROWS_KEY))} (row numbers as the loader counts them: "
        "line numbers for JSON lines). Nothing from this step was saved. Check those rows, lower the "
        "learning rate, or resume from the last checkpoint")
