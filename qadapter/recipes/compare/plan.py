"""What the steps of a comparison hand each other: the checked :class:`Plan` and the
:class:`Training` it produced (see :mod:`.run`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .evaluations import Context, Evaluation
from .methods import MethodSpec, PolicyPoint


@dataclass
class Plan:
    """What a comparison will do, checked before anything is trained."""

    out: Path
    job: Any
    config: Any
    specs: list[MethodSpec]
    points: list[PolicyPoint]
    strengths: list[float] | None
    benchmarks: list[str]
    evaluations: list[Evaluation]
    limits: dict[str, int | None]
    eval_seed: int
    bbh_tasks: list[str]
    max_new_tokens: int
    eval_batch_size: int
    data_dir: Any
    device: str
    dtype: Any
    fingerprint: dict[str, Any]
    commands: list[str]
    train_argv: Sequence[str] | None

    def context(self, training: Training, progress: bool) -> Context:
        return Context(limits=self.limits, seed=self.eval_seed, batch_size=self.eval_batch_size,
                       max_new_tokens=self.max_new_tokens, bbh_tasks=self.bbh_tasks, data_dir=self.data_dir,
                       held_out=training.held_out, held_out_hash=training.held_out_hash, progress=progress,
                       trained_prompts=training.user_turns())


@dataclass
class Training:
    """What the training step leaves: every spec's report, the one split they trained on."""

    reports: dict[str, dict]
    train_commands: dict[str, str]
    trained: list[str]
    train_pairs: list[dict]
    held_out: list[dict]
    held_out_hash: str
    split_info: dict[str, Any]

    def user_turns(self) -> frozenset[str]:
        """Every user turn of the training pairs (their prompt: a message list, or a plain string)."""
        from ...chat import as_messages

        return frozenset(m["content"] for row in self.train_pairs
                         for m in as_messages(row["prompt"] if "prompt" in row else row["chosen"][:-1])
                         if m.get("role") == "user")
