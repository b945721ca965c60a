"""What qadapter needs to know about a Hugging Face causal LM and its PEFT adapter.

The helpers the model, the scorer, the decoder and the trainer share: unwrapping a PEFT model, its
text config and attention kind, the output head (when projecting hidden states with it computes
exactly the model's logits), positions that ignore left padding, end-of-turn and padding ids, the
LoRA config and its target-module check, a fingerprint of the base weights, and running the base
and the adapter branch in ONE batch (:class:`SplitRows`). Nothing here imports another qadapter
module but ``errors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError, option

# Config attributes by which some architectures post-process the output of their LM head (a
# projection of gathered hidden states would skip that); a model with any of them set takes the
# logits path everywhere.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling",
                        "output_multiplier", "lm_head_multiplier")


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def inner_model(model):
    """The transformers model (with LoRA layers injected, for a PEFT model)."""
    return model.get_base_model() if is_peft(model) else model


def base_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, deterministic fingerprint of the *base* weights (LoRA weights excluded).

    Hashes every parameter's name, shape and dtype plus a strided sample of at most 4096 of its
    values, so two different checkpoints of one architecture differ, while a 70B model still hashes
    in seconds. Works on the bare model and on a PEFT-wrapped one (same names after unwrapping).
    Under DeepSpeed ZeRO-3 each parameter is gathered for the read (a collective: every rank calls
    this), so a partitioned model fingerprints as the whole one does.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        with _gathered(param):
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
            shape = tuple(param.shape)  # a partitioned parameter is empty outside the gather
        digest.update(f"{name}|{shape}|{param.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _gathered(param):
    """A ZeRO-3 partitioned parameter (it carries ``ds_id``; its local data is empty) gathered
    whole for reading, one at a time so no more than one full weight is ever materialized."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed  # only a model DeepSpeed partitioned gets here

    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


def lora_config(r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.05,
                target_modules: Sequence[str] | str = ("q_proj", "v_proj")):
    """A PEFT LoRA config with the reference defaults (method.md); ``"all-linear"`` is accepted."""
    from peft import LoraConfig

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
                      task_type="CAUSAL_LM", bias="none")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a left-padded row computes what the unpadded row would."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm_logits(model, input_ids, attention_mask=None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits of ``model`` (B, T, V), or only at sequence ``positions`` (B, len(positions), V).

    Goes through the model's own ``forward`` (so DDP / FSDP / DeepSpeed wrappers see the call) and
    asks it for the logits at ``positions`` only (``logits_to_keep``), which spares the
    vocabulary projection at every other position.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    if positions is None:
        return model(**kwargs).logits
    return model(**kwargs, logits_to_keep=positions).logits


def text_config(model):
    """The text model's config of ``model`` (a PEFT model, a wrapper-free transformers model, or a
    multimodal one whose text part has its own config)."""
    inner = inner_model(model)
    config = inner.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_kind(model, longest_row: int) -> str | None:
    """'sdpa' or 'eager' when a custom 4D attention mask is honoured as given, else None (flash
    attention takes no 4D mask; a sliding window shorter than a row would be lost under it). The
    trainer's shared-prompt layout and the scorer's pack several sequences into a row only then."""
    text = text_config(model)
    inner = inner_model(model)
    kind = getattr(text, "_attn_implementation", None) or getattr(inner.config, "_attn_implementation", None)
    if kind not in ("sdpa", "eager"):
        return None
    window = getattr(text, "sliding_window", None)
    if window is not None and getattr(text, "use_sliding_window", True) and longest_row > window:
        return None
    return kind


def check_target_modules(model, target_modules) -> None:
    """Refuse LoRA target module names that match no module of ``model`` (PEFT matches a name
    against each module's full name or its last components), listing the linear modules it has."""
    if target_modules is None or (isinstance(target_modules, str) and target_modules == "all-linear"):
        return
    names = [m.strip() for m in target_modules.split(",")] if isinstance(target_modules, str) else list(target_modules)
    modules = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if t and not any(n == t or n.endswith("." + t) for n in modules)]
    if missing or not any(names):
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"{option('lora_target_modules', ','.join(names))}: no module named "
                          f"{', '.join(missing) or '(none given)'} in this model; its linear modules are "
                          f"{', '.join(linear) or '(none)'} (or use all-linear)")


def _as_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, (list, tuple, set)):
        return [int(v) for v in x]
    return [int(x)]


def eos_token_ids(model, tokenizer, override=None) -> list[int]:
    """End-of-turn ids: ``override`` if given, else the union of the model's generation config's
    ``eos_token_id`` (an int or a list) and the tokenizer's ``eos_token_id``."""
    if override is not None:
        return _as_list(override)
    ids: list[int] = []
    gen_cfg = getattr(inner_model(model), "generation_config", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for t in _as_list(source):
            if t not in ids:
                ids.append(t)
    return ids


def pad_token_id(tokenizer, model=None, eos: Sequence[int] | None = None) -> int:
    """The id to pad with (padding is always masked, so any id is correct; this one is conventional):
    the tokenizer's pad token, else the model's generation config's, else the first end-of-turn id
    (``eos``, or the tokenizer's), else 0."""
    gen_cfg = getattr(inner_model(model), "generation_config", None) if model is not None else None
    eos_id = eos[0] if eos else getattr(tokenizer, "eos_token_id", None)
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(gen_cfg, "pad_token_id", None), eos_id):
        if candidate is not None:
            return int(_as_list(candidate)[0])
    return 0


def fast_plan(model, adapter: str):
    """How the fast engine computes both branches in one batch.

    ``("split", layers)`` when every LoRA layer of ``adapter`` is a plain (vanilla, unmerged) LoRA
    ``Linear`` (then :class:`SplitRows` applies the adapter to the adapter rows only);
    ``("peft", None)`` (PEFT's mixed-adapter batch) for other layer types PEFT's mixed batch
    supports (e.g. LoRA on embeddings, LoRA variants); ``("reference", None)`` where neither applies
    (DoRA, merged adapters): then decoding falls back to the two-forward reference.
    """
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return "reference", None
    layers, plain = [], True
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        if getattr(module, "use_dora", {}).get(adapter, False) or getattr(module, "merged", False):
            return "reference", None
        if "forward" in module.__dict__:  # someone (e.g. accelerate) already wraps this layer's forward
            plain = False
        if adapter in getattr(module, "lora_embedding_A", {}) or (
                adapter in module.lora_A and (type(module) is not LoraLinear
                                              or adapter in getattr(module, "lora_variant", {}))):
            plain = False
        elif adapter in module.lora_A:
            layers.append(module)
    return ("split", layers) if plain else ("peft", None)


def _power_of_two(value) -> bool:
    """Whether multiplying by ``value`` is exact in floating point (a power of two, either sign)."""
    mantissa, _ = math.frexp(float(value))
    return abs(mantissa) == 0.5


def _split_rows_forward(module, split: int, adapter: str, linear=F.linear):
    """A forward for one LoRA ``Linear`` that applies the adapter to rows ``split:`` only.

    Rows ``:split`` get ``base_layer(x)`` (what PEFT computes with the adapter disabled), rows
    ``split:`` get ``base_layer(x) + lora_B(lora_A(x)) · scaling`` (what PEFT computes with it enabled;
    dropout is the identity in eval mode). Same operations, operand shapes and dtype casts as
    ``peft.tuners.lora.Linear.forward``, minus its per-call bookkeeping: this runs 2 × layers × tokens
    times per generation, so it calls ``F.linear`` directly where the modules are plain ``nn.Linear``
    (``linear``, F.linear's signature, computes the base product of a two-way split: the two-branch
    decoder passes :class:`qadapter.products.SmallProducts`).
    """
    base_layer, lora_A, lora_B = module.base_layer, module.lora_A[adapter], module.lora_B[adapter]
    scaling = module.scaling[adapter]
    lora_dtype = lora_A.weight.dtype
    plain = type(base_layer) is torch.nn.Linear and type(lora_A) is torch.nn.Linear and type(lora_B) is torch.nn.Linear
    if plain:
        W, b, A, A_b, B_w, B_b = (base_layer.weight, base_layer.bias, lora_A.weight, lora_A.bias,
                                  lora_B.weight, lora_B.bias)
        if split == 0 and _power_of_two(scaling):
            # every row an adapter row (the one-branch decoder): scaling folded into lora_B, which
            # is exact for a power of two (LoRA's default alpha = 2·r), and no row slicing: four
            # ops a layer instead of seven, bit-equal to PEFT's forward
            B_s = B_w * scaling
            B_bs = None if B_b is None else B_b * scaling

            def forward(x, *args, **kwargs):
                result = F.linear(x, W, b)
                rows = x if x.dtype == lora_dtype else x.to(lora_dtype)
                result += F.linear(F.linear(rows, A, A_b), B_s, B_bs).to(result.dtype)
                return result

            return forward

        def forward(x, *args, **kwargs):
            result = linear(x, W, b)
            rows = x[split:]
            if rows.dtype != lora_dtype:
                rows = rows.to(lora_dtype)
            delta = F.linear(F.linear(rows, A, A_b), B_w, B_b) * scaling
            result[split:] += delta.to(result.dtype)
            return result
    else:
        def forward(x, *args, **kwargs):
            result = base_layer(x, *args, **kwargs)
            delta = lora_B(lora_A(x[split:].to(lora_dtype))) * scaling
            result[split:] += delta.to(result.dtype)
            return result

    return forward


@contextlib.contextmanager
def replaced_forward(module, forward):
    """Within the block, ``module`` runs ``forward`` instead of its own (its module hooks still run)."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


class ReplacedForwards:
    """Context manager: within the block, each module of ``forwards`` [(module, forward)] runs its
    ``forward`` instead of its own (module hooks still run). Re-enterable; the forwards are built
    once, so entering and leaving costs two dict operations per module."""

    def __init__(self, forwards):
        self.forwards = list(forwards)

    def __enter__(self):
        try:
            for module, forward in self.forwards:
                module.forward = forward
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for module, _ in self.forwards:
            module.__dict__.pop("forward", None)


class SplitRows(ReplacedForwards):
    """Context manager: within the block, every LoRA layer in ``layers`` applies ``adapter`` to batch
    rows ``split:`` only (rows ``:split`` see the base model). ``linear`` (F.linear's signature)
    computes the base products of a split (the two-branch decoder's order measured faster,
    :mod:`qadapter.products`)."""

    def __init__(self, layers, split: int, adapter: str, linear=F.linear):
        super().__init__((layer, _split_rows_forward(layer, split, adapter, linear)) for layer in layers)


def active_adapter(model) -> str:
    active = model.active_adapter
    return active if isinstance(active, str) else model.active_adapters[0]


def projection_head(model, *, training: bool = False):
    """The output embedding when projecting gathered hidden states with it computes exactly what
    the model's logits are (a plain ``nn.Linear`` whose forward nobody replaced, not on the meta
    device, no logit post-processing), else None.

    ``training=False`` (scoring, decoding) also refuses a head with module hooks. ``training=True``
    (the trainer's fused head, which runs inside the head's own forward, so its hooks still run:
    FSDP2 gathers the weight there) instead refuses a trained head and a ZeRO-3 partitioned one.
    """
    inner = inner_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or "forward" in head.__dict__ or head.weight.device.type == "meta":
        return None
    if training and (head.weight.requires_grad or hasattr(head.weight, "ds_id")):
        return None
    if not training and (head._forward_hooks or head._forward_pre_hooks):
        return None
    text = text_config(model)
    if any(getattr(text, name, None) not in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING):
        return None
    return head
