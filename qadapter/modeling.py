"""The model: one set of weights serves both π1 and Q̂.

zθ = the logits of the causal LM *with* a PEFT LoRA adapter, z1 = those of the same model with the
adapter disabled (computed without gradient), log π1 = log-softmax(z1); Q̂ = q_scale·(zθ − z1)
(``residual``, the default) or zθ (``full``, the authors' code). :class:`QAdapter` is the
customized policy π̃ of eq. (1): it scores text and generates through the composed logits, and it
saves to / loads from a folder that PEFT itself can load, plus ``qadapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import __version__
from .errors import ConfigError, SaveError, UserError, check_number, option
from .objective import NORMALIZERS, PARAMETERIZATIONS, VALUE_PAIRINGS, customized_logits, q_values

CONFIG_NAME = "qadapter_config.json"
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

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "QAdapterSettings":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(cls)}
        # written before the residual parameterization existed: the authors' Q̂ = adapter logits
        data.setdefault("parameterization", "full")
        data.setdefault("normalizer", "longest_sequence")
        return cls(**{k: v for k, v in data.items() if k in known})


def base_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, deterministic fingerprint of the *base* weights (LoRA weights excluded).

    Hashes every parameter's name, shape and dtype plus a strided sample of at most 4096 of its
    values, so two different checkpoints of one architecture differ, while a 70B model still hashes
    in seconds. Works on the bare model and on a PEFT-wrapped one (same names after unwrapping).
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


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
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_kind(model, longest_row: int) -> str | None:
    """'sdpa' or 'eager' when a custom 4D attention mask is honoured as given, else None (flash
    attention takes no 4D mask; a sliding window shorter than a row would be lost under it). The
    trainer's shared-prompt layout and the scorer's pack several sequences into a row only then."""
    text = text_config(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(text, "_attn_implementation", None) or getattr(inner.config, "_attn_implementation", None)
    if kind not in ("sdpa", "eager"):
        return None
    window = getattr(text, "sliding_window", None)
    if window is not None and getattr(text, "use_sliding_window", True) and longest_row > window:
        return None
    return kind


def save_atomically(output_dir: str | os.PathLike, write, *, manifest: bool = True) -> Path:
    """Run ``write(folder)`` into a temporary sibling folder that then replaces ``output_dir``, so
    a crash never leaves a half-written model behind (and an old one survives a failed save).

    ``manifest``: also record every file's size and SHA-256 (``qadapter_checksums.json``), so that a
    later load detects a truncated or corrupted file. A write that fails (no space left, no
    permission) raises :class:`~qadapter.errors.SaveError` saying so; the previous folder is intact.
    """
    from .integrity import write_manifest

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write(tmp)
        if manifest:
            write_manifest(tmp)
        if output_dir.exists():
            old = output_dir.with_name(output_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            output_dir.rename(old)
            try:
                tmp.rename(output_dir)
            except BaseException:
                old.rename(output_dir)  # put the previous one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = (f"the previous {output_dir} is intact" if output_dir.exists()
                else f"nothing was written to {output_dir}")
        what = f" ({os.strerror(e.errno)})" if e.errno and not e.strerror else ""
        raise SaveError(e.errno, f"could not save {output_dir}: {e.strerror or e}{what}"
                        f"{f' while writing {Path(e.filename).name}' if e.filename else ''}; {kept}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


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


class QAdapter:
    """A pre-trained causal LM plus a residual-Q LoRA adapter: the customized policy π̃.

    ``model`` is a ``peft.PeftModel``; ``settings`` a :class:`QAdapterSettings`. Use
    :meth:`from_pretrained` to load a saved one, or :meth:`create` to start a fresh one.
    """

    def __init__(self, model, tokenizer, settings: QAdapterSettings | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or QAdapterSettings()

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(cls, base_model, tokenizer, settings: QAdapterSettings | None = None, peft_config=None) -> "QAdapter":
        """Wrap ``base_model`` with a fresh LoRA adapter (a zero delta: residual Q̂ starts at 0, so
        π̃ = π1 at tied α's; full Q̂ starts as the base logits)."""
        from peft import get_peft_model

        settings = settings or QAdapterSettings()
        settings.base_fingerprint = base_fingerprint(base_model)
        settings.base_model_name_or_path = settings.base_model_name_or_path or getattr(base_model, "name_or_path", None)
        peft_config = peft_config or lora_config()
        if not isinstance(peft_config.target_modules, str):  # a string is PEFT's regex (or all-linear)
            check_target_modules(base_model, peft_config.target_modules)
        model = get_peft_model(base_model, peft_config)
        return cls(model, tokenizer, settings)

    @classmethod
    def from_pretrained(cls, adapter_dir: str | os.PathLike, base_model=None, tokenizer=None,
                        torch_dtype=None, trust_remote_code: bool = False, **settings_overrides) -> "QAdapter":
        """Load a saved Q-Adapter. ``base_model`` (a model or a path / hub id) defaults to the one it
        was trained on; a base whose weights differ from the training base is refused.

        The adapter is read from safetensors only (a pickled ``adapter_model.bin`` is refused), after
        its files are checked (:func:`qadapter.integrity.verify_folder`: a truncated or corrupted
        file, or non-finite weights, is refused naming the file). A base model that asks to run
        its own code is refused unless ``trust_remote_code=True``.
        """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .integrity import check_no_remote_code, verify_folder

        adapter_dir = Path(adapter_dir)
        cfg_path = adapter_dir / CONFIG_NAME
        if not adapter_dir.is_dir():
            raise UserError(f"{adapter_dir}: no such adapter folder")
        if not cfg_path.is_file():
            raise UserError(f"{adapter_dir} holds no {CONFIG_NAME}: is it a folder saved by qadapter?")
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            pickled = [p.name for p in adapter_dir.glob("*.bin")]
            raise UserError(f"{adapter_dir / (pickled[0] if pickled else 'adapter_model.safetensors')}: "
                            + ("a pickle file, which can run code when loaded; qadapter loads adapter weights "
                               "from adapter_model.safetensors only (convert it once with safetensors, from a "
                               "source you trust)" if pickled else "missing; the adapter folder is incomplete"))
        verify_folder(adapter_dir, "adapter", finite=True)
        try:
            settings = QAdapterSettings.from_file(cfg_path)
        except (TypeError, ValueError) as e:
            raise UserError(f"{cfg_path}: invalid settings ({e})") from None
        for key, value in settings_overrides.items():
            if value is not None:
                setattr(settings, key, value)
        if base_model is None or isinstance(base_model, (str, os.PathLike)):
            name = str(base_model or settings.base_model_name_or_path)
            from .embedded import resolve_model_path
            path = resolve_model_path(name)
            check_no_remote_code(path, trust_remote_code)
            base_model = AutoModelForCausalLM.from_pretrained(path, revision=settings.base_model_revision if base_model is None else None,
                                                              dtype=torch_dtype or torch.float32,
                                                              trust_remote_code=trust_remote_code)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        found = base_fingerprint(base_model)
        if settings.base_fingerprint and found != settings.base_fingerprint:
            raise ValueError(
                f"refusing to load the Q-Adapter in {adapter_dir} onto this base model: it was trained on "
                f"{settings.base_model_name_or_path!r} (weights fingerprint {settings.base_fingerprint}) but the "
                f"given base {getattr(base_model, 'name_or_path', '?')!r} has fingerprint {found}. "
                f"Load it onto the base it was trained on.")
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(adapter_dir if (adapter_dir / "tokenizer_config.json").exists()
                                                      else base_model.name_or_path)
        model = PeftModel.from_pretrained(base_model, adapter_dir)
        model.eval()
        return cls(model, tokenizer, settings)

    def save_pretrained(self, output_dir: str | os.PathLike) -> Path:
        """Save atomically: the PEFT adapter (loadable by ``PeftModel.from_pretrained``), the
        tokenizer and ``qadapter_config.json``. Weights that are not finite are refused (nothing is
        written); a failed write raises :class:`~qadapter.errors.SaveError`, the previous folder intact."""
        from .integrity import check_finite_weights

        check_finite_weights(self.model)

        def write(folder: Path) -> None:
            self.model.save_pretrained(folder)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(folder)
            (folder / CONFIG_NAME).write_text(self.settings.to_json(), encoding="utf-8")

        return save_atomically(output_dir, write)

    # ----------------------------------------------------------------- the policy
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def branch_logits(self, input_ids, attention_mask=None, positions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapter logits zθ, base logits z1), each (B, T, V) float32 (or at ``positions``): two
        passes of one network, the base one without gradient."""
        adapter = causal_lm_logits(self.model, input_ids, attention_mask, positions)
        with torch.no_grad(), self.model.disable_adapter():
            base = causal_lm_logits(self.model, input_ids, attention_mask, positions)
        return adapter.float(), base.float()

    def q_and_base_logprobs(self, input_ids, attention_mask=None, positions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q̂, log π1), each (B, T, V) (or at ``positions``)."""
        adapter, base = self.branch_logits(input_ids, attention_mask, positions)
        q = q_values(adapter, base, self.settings.parameterization, self.settings.q_scale)
        return q, F.log_softmax(base, dim=-1)

    def logits(self, input_ids, attention_mask=None, *, alpha_0: float | None = None,
               alpha_tilde: float | None = None, strength: float | None = None, positions=None) -> torch.Tensor:
        """Next-token logits of the customized policy π̃, eq. (1): (B, T, V)."""
        adapter, base = self.branch_logits(input_ids, attention_mask, positions)
        return self.settings.logits(adapter, base, alpha_0, alpha_tilde, strength)

    def base_logits(self, input_ids, attention_mask=None, positions=None) -> torch.Tensor:
        """Next-token logits of the pre-trained policy π1 (adapter disabled)."""
        with self.model.disable_adapter():
            return causal_lm_logits(self.model, input_ids, attention_mask, positions)

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], responses: Sequence[Any], *, batch_size: int = 8,
              policy: str = "customized") -> list[float]:
        """Log-probability of each response given its prompt, summed over response tokens.

        ``prompts`` are chat message lists (or strings, used as a single user turn); ``responses``
        strings. ``policy`` is ``"customized"`` (π̃), ``"base"`` (π1) or ``"adapter"`` (softmax(zθ),
        the adapter model alone). Both branches run in one forward, responses to the same prompt
        share its computation (:func:`qadapter.scoring.score`; for several policies or decoding
        strengths at once, call that directly); ``batch_size`` responses per forward.
        """
        from .data.tokenization import tokenize_pair

        rows = []
        for prompt, response in zip(prompts, responses):
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            completion = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
            ids = tokenize_pair(prompt, completion, completion, self.tokenizer, max_length=10**9)
            rows.append((ids["prompt_input_ids"], ids["chosen_input_ids"]))
        return self._score_ids(rows, policy, batch_size) if rows else []

    def _score_ids(self, rows, policy: str, batch_size: int = 8) -> list[float]:
        """Summed log π(response | prompt) of (prompt ids, response ids) rows, by :func:`qadapter.scoring.score`."""
        from .scoring import score

        if policy not in ("customized", "base", "adapter"):
            raise ValueError(f"policy must be 'customized', 'base' or 'adapter', got {policy!r}")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return score(self.model, [(p, r) for p, r in rows], settings=self.settings, policies=(policy,),
                     pad_token_id=pad, batch_size=batch_size, allow_empty=True).logprobs[policy]

    @torch.no_grad()
    def generate(self, prompts, **kwargs):
        """Generate from π̃ (see :func:`qadapter.generation.generate` for the arguments)."""
        from .generation import generate

        kwargs["alpha_0"], kwargs["alpha_tilde"] = self.settings.decoding_alphas(
            kwargs.pop("alpha_0", None), kwargs.pop("alpha_tilde", None), kwargs.pop("strength", None))
        kwargs.setdefault("parameterization", self.settings.parameterization)
        kwargs.setdefault("q_scale", self.settings.q_scale)
        return generate(self.model, self.tokenizer, prompts, **kwargs)
