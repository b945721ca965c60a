"""π̃ at any strength inside vLLM: ``QAdapterForCausalLM``, an out-of-tree vLLM model
(:mod:`qadapter.vllm.plugin` registers it; ``python -m qadapter.vllm serve ADAPTER --plugin`` starts it).

vLLM's logits processors see one model's logits, and its LoRA support one adapter model; π̃ needs
both branches of a residual Q-Adapter, zθ (base + LoRA) and z1 (the base), at every step. So this
model holds both as two vLLM networks of the base architecture, ``adapter`` (the LoRA delta
scaling·B·A merged into its weights at load) and ``base``, each with its own attention layers and
so its own KV cache in vLLM's paged cache; ``forward`` runs both on the same tokens and returns
their hidden states side by side, and ``compute_logits`` composes the two branches' logits per
request with :meth:`qadapter.settings.QAdapterSettings.logits` (the one place the rule lives) at the
request's strength: ``vllm_xargs: {"strength": s}`` in the OpenAI request (SamplingParams.extra_args),
read by :class:`StrengthLogitsProcessor`, which vLLM updates with the batch's rows before each
forward (vllm/v1/worker/gpu_input_batch.py, ``refresh_metadata``, called from the runner's
``_update_states`` before ``execute_model`` computes logits). A request without it gets the
adapter's saved policy. The logits vLLM samples from, and the logprobs it returns, are π̃'s.

Limits: V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``, what vLLM's CPU build uses without Triton);
no prompt logprobs (their logits rows are positions of one request, not the batch's requests);
Llama-family bases (the embedded SmolLM2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ..settings import CONFIG_NAME, QAdapterSettings
from .launch import ADAPTER_KEY

STRENGTH = "strength"


class StrengthLogitsProcessor(LogitsProcessor):
    """Tracks each batch row's requested strength (its own ``apply`` changes nothing: the model
    composes π̃ itself, so that vLLM's returned logprobs are π̃'s)."""

    latest: "StrengthLogitsProcessor | None" = None

    @classmethod
    def validate_params(cls, params) -> None:
        extra = params.extra_args or {}
        if STRENGTH in extra:
            s = extra[STRENGTH]
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise ValueError(f"vllm_xargs.strength must be a finite number > 0, got {s!r}")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: not served by the qadapter plugin (pi-tilde is composed per request row)")

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        self.rows: dict[int, float] = {}
        StrengthLogitsProcessor.latest = self

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, _ in batch_update.added:
            s = (params.extra_args or {}).get(STRENGTH) if params is not None else None
            if s is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = float(s)
        for a, b, direction in batch_update.moved:
            va, vb = self.rows.pop(a, None), self.rows.pop(b, None)
            if va is not None:
                self.rows[b] = va
            if direction == MoveDirectionality.SWAP and vb is not None:
                self.rows[a] = vb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def _lora_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """{HF weight name: scaling·B·A} of the PEFT LoRA in ``folder`` (float32)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("use_dora") or cfg.get("modules_to_save") or cfg.get("bias", "none") != "none":
        raise ValueError(f"{folder}: only plain LoRA adapters (no DoRA, modules_to_save, bias) run in the plugin")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r  # PEFT's LoraLayer scaling
    weights = load_file(str(folder / "adapter_model.safetensors"))
    deltas = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            b = weights[module + ".lora_B.weight"]
            deltas[module.removeprefix("base_model.model.") + ".weight"] = scaling * (b.float() @ a.float())
    return deltas


class QAdapterForCausalLM(nn.Module):
    """Both branches of a residual Q-Adapter in one vLLM model (module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        folder = getattr(vllm_config.model_config.hf_config, ADAPTER_KEY, None)
        if not folder:
            raise ValueError(f"QAdapterForCausalLM needs hf_overrides {{'{ADAPTER_KEY}': ADAPTER_DIR}} "
                             "(python -m qadapter.vllm serve ADAPTER --plugin sets it)")
        self.folder = Path(folder)
        self.settings = QAdapterSettings.from_file(self.folder / CONFIG_NAME)
        self.adapter = LlamaForCausalLM(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "adapter"))
        self.base = LlamaForCausalLM(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "base"))
        self.make_empty_intermediate_tensors = self.base.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        h_adapter = self.adapter(input_ids, positions, intermediate_tensors, inputs_embeds)
        h_base = self.base(input_ids, positions, intermediate_tensors, inputs_embeds)
        return torch.cat([h_adapter, h_base], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h_adapter, h_base = hidden_states.chunk(2, dim=-1)
        z_adapter = self.adapter.compute_logits(h_adapter).float()
        z_base = self.base.compute_logits(h_base).float()
        tracker = StrengthLogitsProcessor.latest
        rows = tracker.rows if tracker is not None else {}
        out = self.settings.logits(z_adapter, z_base)  # the saved policy for rows without a strength
        for s in set(v for i, v in rows.items() if i < out.shape[0]):
            idx = torch.tensor([i for i, v in rows.items() if v == s and i < out.shape[0]], dtype=torch.long)
            out[idx] = self.settings.logits(z_adapter[idx], z_base[idx], strength=s)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = list(weights)
        deltas = _lora_deltas(self.folder)
        missing = set(deltas) - {name for name, _ in weights}
        if missing:
            raise ValueError(f"{self.folder}: LoRA modules not in the base checkpoint: {sorted(missing)[:3]}")
        both = [(f"base.{n}", w) for n, w in weights]
        both += [(f"adapter.{n}", w.float() + deltas[n] if n in deltas else w) for n, w in weights]
        return AutoWeightsLoader(self).load_weights(both)
