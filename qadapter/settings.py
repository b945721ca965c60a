"""The one settings type of a trained Q-Adapter: everything besides the LoRA weights that defines it.

:class:`QAdapterSettings` is written once, as ``qadapter_config.json`` next to PEFT's adapter files
(:meth:`QAdapterSettings.save`), derived from the training config by
:meth:`QAdapterSettings.from_config` (the trainer's :class:`~qadapter.trainer.QAdapterConfig`
validates its method fields through this class, so each knob is checked in one place), and read
back by every loader. The α's may be changed at decode time (:meth:`QAdapterSettings.decoding_alphas`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .errors import UserError, check_number
from .objective import NORMALIZERS, PARAMETERIZATIONS, VALUE_PAIRINGS, customized_logits


CONFIG_NAME = "qadapter_config.json"


def strength_values(value, adapters: int, field: str = "strength") -> list[float] | None:
    """THE strength rule, for a Q-Adapter (a stack of one) and a stack of ``adapters`` alike.

    ``value``: None (the saved strengths: returns None), one number (every adapter at it), or one
    number per adapter (a sequence, or a string ``"S1,S2,..."`` as the command line gives it); a
    one-element sequence counts as one number. Any other count is a :class:`~qadapter.errors.UserError`
    (a ValueError) naming ``field`` (the flag or request field the value came from) and both counts. Each strength must be a finite
    number >= 0 (a single Q-Adapter further needs > 0: :meth:`QAdapterSettings.decoding_alphas`).
    """
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise UserError(f"{field}: {value!r} is not a number or a comma-separated list of numbers") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)]
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise UserError(f"{field}: every strength must be a number, got {list(value)!r}")
        values = [float(v) for v in value]
    else:
        raise UserError(f"{field} must be a number or a list of numbers, got {type(value).__name__}")
    if len(values) == 1:
        values = values * adapters
    elif len(values) != adapters:
        raise UserError(f"{field}: {len(values)} values for {adapters} adapter{'s' if adapters != 1 else ''}; give "
                         f"one value (every adapter at it) or {adapters} (one per adapter, in order)")
    for v in values:
        if not (v >= 0 and math.isfinite(v)):
            raise UserError(f"{field}: a strength must be a finite number >= 0, got {v}")
    return values


ADAPTER_NAME = "default"  # PEFT's default adapter name; "__base__" selects no adapter in mixed batches


@dataclass
class QAdapterSettings:
    """Everything besides the LoRA weights that defines a trained Q-Adapter (saved as qadapter_config.json).

    ``parameterization`` and ``q_scale`` define Q̂ (``residual``: q_scale·(zθ − z1), see
    :func:`qadapter.objective.q_values`); alpha_tilde (α̃) and alpha_0 (α0) define the customized
    policy and may be changed at decode time (:meth:`decoding_alphas`); gamma, beta, normalizer,
    value_pairing and reference_compat record how it was trained. Folders saved before the
    residual parameterization existed hold no ``parameterization`` and load as ``full``.
    """

    alpha_tilde: float = 1.0
    alpha_0: float | None = None  # None: tied to alpha_tilde (residual) or the authors' 0.01 (full)
    gamma: float = 1.0
    beta: float = 0.1
    normalizer: str = "none"
    parameterization: str = "residual"
    value_pairing: str = "next_state"
    q_scale: float | None = None  # residual Q̂ = q_scale·(zθ − z1); None: the training α̃
    reference_compat: bool = False
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_fingerprint: str | None = None
    qadapter_version: str = __version__

    def __post_init__(self):
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {self.parameterization!r}")
        if self.value_pairing not in VALUE_PAIRINGS:
            raise ValueError(f"value_pairing must be one of {VALUE_PAIRINGS}, got {self.value_pairing!r}")
        # the method's knobs, validated here only (QAdapterConfig validates through this class)
        check_number("alpha_tilde", self.alpha_tilde, low=0, low_open=True)
        check_number("alpha_0", self.alpha_0, low=0, allow_none=True)
        check_number("gamma", self.gamma, low=0, low_open=True, high=1)
        check_number("beta", self.beta, low=0)
        if self.alpha_0 is None:
            self.alpha_0 = self.alpha_tilde if self.parameterization == "residual" else 0.01
        if self.q_scale is None:
            self.q_scale = self.alpha_tilde if self.parameterization == "residual" else 1.0

    def decoding_alphas(self, alpha_0: float | None = None, alpha_tilde: float | None = None,
                        strength: float | None = None) -> tuple[float, float]:
        """(α0, α̃) to decode with: the saved ones unless overridden.

        ``strength`` s (residual only, exclusive with the α's) sets α0 = α̃ = q_scale / s, so that
        π̃ ∝ π1 · exp(s · (zθ − z1)): s = 1 is the trained policy (the adapter model itself at
        the saved, tied α's), s → 0 the base model, s > 1 an amplified customization.
        """
        if strength is not None and not isinstance(strength, (int, float)):  # [s]: a Q-Adapter is a stack of one
            strength = strength_values(strength, 1)[0]
        if strength is not None:
            if alpha_0 is not None or alpha_tilde is not None:
                raise ValueError("give either strength or alpha_0 / alpha_tilde, not both")
            if self.parameterization != "residual":
                raise ValueError("strength applies to a residual Q-Adapter; this one is 'full': "
                                 "set alpha_0 / alpha_tilde instead")
            if not strength > 0 or strength == float("inf"):
                raise ValueError(f"strength must be a finite number > 0, got {strength}")
            return self.q_scale / strength, self.q_scale / strength
        return (self.alpha_0 if alpha_0 is None else alpha_0,
                self.alpha_tilde if alpha_tilde is None else alpha_tilde)

    def logits(self, adapter_logits: torch.Tensor, base_logits: torch.Tensor, alpha_0: float | None = None,
               alpha_tilde: float | None = None, strength: float | None = None) -> torch.Tensor:
        """Logits of π̃ (eq. 1) from the raw logits of both branches, at the given decoding strength."""
        a0, at = self.decoding_alphas(alpha_0, alpha_tilde, strength)
        return customized_logits(adapter_logits, base_logits, parameterization=self.parameterization,
                                 q_scale=self.q_scale, alpha_0=a0, alpha_tilde=at)

    @classmethod
    def from_config(cls, config, **extra) -> "QAdapterSettings":
        """The settings a :class:`~qadapter.trainer.QAdapterConfig` trains (its method fields)."""
        names = ("alpha_tilde", "alpha_0", "gamma", "beta", "normalizer", "parameterization", "value_pairing",
                 "reference_compat")
        return cls(**{n: getattr(config, n) for n in names}, **extra)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/qadapter_config.json`` (atomically): the one place it is written."""
        from .io import write_text_atomically

        return write_text_atomically(Path(folder) / CONFIG_NAME, self.to_json())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "QAdapterSettings":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(cls)}
        # written before the residual parameterization existed: the authors' Q̂ = adapter logits
        data.setdefault("parameterization", "full")
        data.setdefault("normalizer", "longest_sequence")
        return cls(**{k: v for k, v in data.items() if k in known})
