"""Trainers, one per method, each with its config dataclass and collator next to it (TRL's layout)."""

from .qadapter_config import QAdapterConfig
from .qadapter_trainer import PreferencePairCollator, QAdapterTrainer, qadapter_step

__all__ = ["QAdapterConfig", "QAdapterTrainer", "PreferencePairCollator", "qadapter_step"]
