"""Stacked customizations: Q-Adapters trained one on top of another (docs/method.md, "Stacking").

A residual Q-Adapter at strength 1 (tied α0 = α̃ = q_scale) *is* its adapter model: π̃ = softmax(zθ).
So the customized policy of an earlier adapter is the base network with that LoRA added, and a new
Q-Adapter "on" it trains an ordinary residual adapter on a copy of the base with the earlier LoRA(s)
merged in (π1 = softmax(z_merged), exactly; the trainer is unchanged). Adapter g of a stack therefore
sees the base plus the deltas of adapters 1..g−1 as its π1, and with z_g = the logits of the base with
adapters 1..g active (z_0 = the base), each level is π_g ∝ π_{g−1}·exp(s_g·(z_g − z_{g−1})), i.e.

    log π(·|s) = log softmax(z_0) + Σ_g s_g·(z_g − z_{g−1}) + const                    (stack)

with a per-adapter decoding strength s_g (1 = as trained; s_g → 0 switches adapter g off, leaving the
later ones' residuals). At all s_g = 1 it telescopes to softmax(z_k): the network with every LoRA.

:class:`QAdapterStack` is that policy, with the :class:`~qadapter.modeling.QAdapter` surface
(``logits``, ``score``, ``generate``, ``save_pretrained``, ``from_pretrained``). On disk a stack is
one folder: ``qadapter_stack.json`` (the order, the ORIGINAL base's name and fingerprint) and one
sub-folder per adapter, each a PEFT folder with its own ``qadapter_config.json``. Decoding runs all
k+1 branches in one forward per token (:class:`StackFastEngine`: row group g gets the base plus the
deltas of adapters 1..g, a generalization of :class:`qadapter.generation.SplitRows`).

Why one module of ~500 lines: a stack's folder format, its merge, its fast engine and its
:class:`QAdapterStack` API change together (a new field touches all four).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .backbone import base_fingerprint, causal_lm_logits, fast_plan
from .generation import Engine, generate as _generate, new_cache
from .modeling import QAdapter
from .io import save_atomically
from .settings import CONFIG_NAME, QAdapterSettings, strength_values

STACK_CONFIG = "qadapter_stack.json"
PEFT_CONFIG = "adapter_config.json"
STACK_FORMAT = "qadapter-stack"

__all__ = ["STACK_CONFIG", "QAdapterStack", "StackSpec", "read_stack", "default_strength", "stack_logits",
           "merge_into", "save_extended", "is_stack_or_adapter"]


# --------------------------------------------------------------------------------------- the math
def default_strength(settings: QAdapterSettings) -> float:
    """The strength s at which an adapter's saved policy is π_{g−1}·exp(s·(zθ − z1)).

    A residual adapter at tied α0 = α̃: s = q_scale / α̃ (1 as trained). A plain adapter (the
    baselines: Q̂ = zθ with α0 = 0, α̃ = 1, the policy is the adapter model softmax(zθ)): s = 1,
    since softmax(zθ) = π1·exp(zθ − z1) up to normalization. Anything else (a full Q̂ mixed with
    α0 > 0, or untied α's) has no such form and cannot be stacked.
    """
    if settings.parameterization == "residual" and math.isclose(settings.alpha_0, settings.alpha_tilde, rel_tol=1e-12):
        return settings.q_scale / settings.alpha_tilde
    if settings.parameterization == "full" and settings.alpha_0 == 0.0 and settings.alpha_tilde == 1.0:
        return 1.0
    raise ValueError(
        f"this adapter (parameterization={settings.parameterization!r}, alpha_0={settings.alpha_0}, "
        f"alpha_tilde={settings.alpha_tilde}) cannot be stacked: its policy is not π1·exp(s·(zθ − z1)). "
        "Stack residual adapters at tied α0 = α̃ (the default) or plain adapters (SFT / DPO).")


def stack_logits(branch_logits: Sequence[torch.Tensor], strengths: Sequence[float]) -> torch.Tensor:
    """Logits of the stacked policy from the k+1 branches z_0..z_k (eq. "stack" of the module docstring)."""
    if len(branch_logits) != len(strengths) + 1:
        raise ValueError(f"{len(branch_logits)} branches for {len(strengths)} strengths (need k+1 for k)")
    out = F.log_softmax(branch_logits[0].float(), dim=-1)
    for g, s in enumerate(strengths, start=1):
        if s != 0.0:
            out = out + s * (branch_logits[g].float() - branch_logits[g - 1].float())
    return out


# --------------------------------------------------------------------------------------- on disk
@dataclass
class StackSpec:
    """What a stack (or single adapter) folder holds, read without loading any model."""

    folders: list[Path]
    settings: list[QAdapterSettings]
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_fingerprint: str | None = None
    tokenizer_dir: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def strengths(self) -> list[float]:
        return [default_strength(s) for s in self.settings]


def _plain_settings(folder: Path) -> QAdapterSettings:
    """A plain PEFT adapter (a baseline): its policy is the adapter model itself."""
    cfg = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    return QAdapterSettings(parameterization="full", alpha_0=0.0, alpha_tilde=1.0,
                            base_model_name_or_path=cfg.get("base_model_name_or_path"))


def is_stack_or_adapter(path) -> bool:
    path = Path(path)
    return any((path / name).is_file() for name in (STACK_CONFIG, CONFIG_NAME, PEFT_CONFIG))


def read_stack(path: str | os.PathLike) -> StackSpec:
    """The adapters of a stack folder, or of a single adapter folder (a Q-Adapter or a plain PEFT
    LoRA) read as a stack of one, in order."""
    path = Path(path)
    if (path / STACK_CONFIG).is_file():
        meta = json.loads((path / STACK_CONFIG).read_text(encoding="utf-8"))
        if meta.get("format") != STACK_FORMAT:
            raise ValueError(f"{path / STACK_CONFIG} is not a {STACK_FORMAT} file")
        folders = [path / name for name in meta["adapters"]]
        settings = [QAdapterSettings.from_file(f / CONFIG_NAME) if (f / CONFIG_NAME).is_file() else _plain_settings(f)
                    for f in folders]
        tok = path if (path / "tokenizer_config.json").is_file() else None
        return StackSpec(folders, settings, meta.get("base_model_name_or_path"), meta.get("base_model_revision"),
                         meta.get("base_fingerprint"), tok, {k: v for k, v in meta.items() if k not in
                                                            ("adapters", "format")})
    if (path / CONFIG_NAME).is_file():
        s = QAdapterSettings.from_file(path / CONFIG_NAME)
    elif (path / PEFT_CONFIG).is_file():
        s = _plain_settings(path)
    else:
        raise FileNotFoundError(f"{path} holds no {STACK_CONFIG}, {CONFIG_NAME} or {PEFT_CONFIG}: "
                                "not a stack or adapter folder")
    tok = path if (path / "tokenizer_config.json").is_file() else None
    return StackSpec([path], [s], s.base_model_name_or_path, s.base_model_revision, s.base_fingerprint, tok)


def _check_base(spec: StackSpec, base_model, where) -> None:
    if not spec.base_fingerprint:
        return
    found = base_fingerprint(base_model)
    if found != spec.base_fingerprint:
        raise ValueError(
            f"refusing to load the stack in {where} onto this base model: its first adapter was trained on "
            f"{spec.base_model_name_or_path!r} (weights fingerprint {spec.base_fingerprint}) but the given base "
            f"{getattr(base_model, 'name_or_path', '?')!r} has fingerprint {found}. Load it onto the base it was "
            "trained on.")


def load_base(spec: StackSpec, base_model, tokenizer, torch_dtype):
    from transformers import AutoTokenizer

    from .embedded import load_model, load_tokenizer, resolve_model_path

    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        given = base_model is not None
        path = resolve_model_path(str(base_model or spec.base_model_name_or_path))
        base_model = load_model(path, revision=None if given else spec.base_model_revision,
                                dtype=torch_dtype or torch.float32)
        tokenizer = tokenizer or load_tokenizer(spec.tokenizer_dir or path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_dir or base_model.name_or_path)
    return base_model, tokenizer


@torch.no_grad()
def merge_into(base_model, path: str | os.PathLike, *, check: bool = True):
    """Merge the adapters of the stack (or adapter) at ``path``, in order, into ``base_model`` (in
    place; pass a copy to keep the original) and return ``(merged model, spec)``.

    The merged model's softmax is the earlier customized policy at strength 1, exactly up to
    rounding; training a residual Q-Adapter on it trains the next level of the stack. The base is
    refused when its fingerprint differs from the one the stack's first adapter was trained on, and
    after each merge the weights are checked against the fingerprint the next adapter recorded.
    """
    from peft import PeftModel

    spec = read_stack(path)
    for s in spec.settings:
        if not math.isclose(default_strength(s), 1.0, rel_tol=1e-9):
            raise ValueError(f"training on {path} needs its policy at strength 1 (the merged network); an adapter "
                             f"in it decodes at strength {default_strength(s)}")
    if check:
        _check_base(spec, base_model, path)
    model = base_model
    for g, (folder, s) in enumerate(zip(spec.folders, spec.settings)):
        if check and g > 0 and s.base_fingerprint and base_fingerprint(model) != s.base_fingerprint:
            # not an error: the sampled weights of a re-merge can differ in the last bits from the merge
            # the adapter was trained on (observed on SmolLM2; cause not yet found); the ORIGINAL
            # base, checked above, is what must match
            warnings.warn(f"adapter {folder} records a training-base fingerprint ({s.base_fingerprint}) that differs "
                          f"from the re-merge of the adapters before it ({base_fingerprint(model)})")
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model, spec


def _write_meta(folder: Path, names: list[str], spec_like: dict) -> None:
    meta = {"format": STACK_FORMAT, "version": 1, "adapters": names, **spec_like}
    (folder / STACK_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")


def _adapter_name(g: int) -> str:
    return f"{g + 1:02d}"


def save_extended(output_dir: str | os.PathLike, on: str | os.PathLike, write_new, tokenizer=None) -> Path:
    """Save the stack ``on`` plus one new adapter as a stack folder (atomically).

    ``write_new(folder)`` writes the new adapter (a PEFT folder with its ``qadapter_config.json``,
    e.g. ``QAdapter.save_pretrained``'s contents); the earlier adapters are copied.
    """
    spec = read_stack(on)

    def write(tmp: Path) -> None:
        names = []
        for g, src in enumerate(spec.folders):
            names.append(_adapter_name(g))
            shutil.copytree(src, tmp / names[-1], ignore=shutil.ignore_patterns("report.json", "*.png", "split"))
            if not (tmp / names[-1] / CONFIG_NAME).is_file():  # a plain PEFT adapter: record what it is
                spec.settings[g].save(tmp / names[-1])
        names.append(_adapter_name(len(spec.folders)))
        (tmp / names[-1]).mkdir()
        write_new(tmp / names[-1])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_meta(tmp, names, {"base_model_name_or_path": spec.base_model_name_or_path,
                                 "base_model_revision": spec.base_model_revision,
                                 "base_fingerprint": spec.base_fingerprint})

    return save_atomically(output_dir, write)


# --------------------------------------------------------------------------------------- the policy
class QAdapterStack:
    """k stacked adapters on one base: the policy of eq. "stack" (module docstring).

    ``model`` is a ``peft.PeftModel`` holding the adapters under ``names`` (in order); ``strengths``
    the per-adapter decoding strengths (default: each adapter's saved one, 1 as trained).
    """

    def __init__(self, model, tokenizer, names: Sequence[str], settings: Sequence[QAdapterSettings], *,
                 strengths: Sequence[float] | None = None, base_model_name_or_path: str | None = None,
                 base_model_revision: str | None = None, base_fingerprint: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.names, self.settings = list(names), list(settings)
        self.strengths = (strength_values(strengths, len(self.names), "strengths")
                          or [default_strength(s) for s in self.settings])
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_revision = base_model_revision
        self.base_fingerprint = base_fingerprint
        self.activate(len(self.names))

    def __repr__(self) -> str:
        return f"QAdapterStack({len(self.names)} adapters on {self.base_model_name_or_path!r}, strengths {self.strengths})"

    def __len__(self) -> int:
        return len(self.names)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base_model=None, tokenizer=None, torch_dtype=None,
                        strengths: Sequence[float] | None = None) -> "QAdapterStack":
        """Load a stack folder (or one adapter folder, as a stack of one) onto its ORIGINAL base
        (``base_model``: a model, a path / hub id, or None for the recorded one); a base whose
        weights differ from the one the first adapter was trained on is refused."""
        from peft import PeftModel

        spec = read_stack(path)
        base_model, tokenizer = load_base(spec, base_model, tokenizer, torch_dtype)
        _check_base(spec, base_model, path)
        names = [f"stack_{_adapter_name(g)}" for g in range(len(spec.folders))]
        model = PeftModel.from_pretrained(base_model, str(spec.folders[0]), adapter_name=names[0])
        for name, folder in zip(names[1:], spec.folders[1:]):
            model.load_adapter(str(folder), adapter_name=name)
        model.eval()
        return cls(model, tokenizer, names, spec.settings, strengths=strengths,
                   base_model_name_or_path=spec.base_model_name_or_path,
                   base_model_revision=spec.base_model_revision, base_fingerprint=spec.base_fingerprint)

    def save_pretrained(self, output_dir: str | os.PathLike) -> Path:
        """Save atomically as a stack folder: one PEFT sub-folder (with its settings) per adapter,
        the tokenizer, and ``qadapter_stack.json`` (the order and the original base's fingerprint)."""
        def write(tmp: Path) -> None:
            folders = []
            for g, (name, settings) in enumerate(zip(self.names, self.settings)):
                folders.append(_adapter_name(g))
                self.model.save_pretrained(tmp / "_peft", selected_adapters=[name])
                src = tmp / "_peft" / name if (tmp / "_peft" / name).is_dir() else tmp / "_peft"
                shutil.move(str(src), str(tmp / folders[-1]))
                shutil.rmtree(tmp / "_peft", ignore_errors=True)
                settings.save(tmp / folders[-1])
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            _write_meta(tmp, folders, {"base_model_name_or_path": self.base_model_name_or_path,
                                       "base_model_revision": self.base_model_revision,
                                       "base_fingerprint": self.base_fingerprint})

        return save_atomically(output_dir, write)

    # ----------------------------------------------------------------- branches
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def activate(self, g: int | None = None) -> None:
        """Adapters 1..g active (g ≥ 1; None: all of them, the state decoding and scoring expect)."""
        g = len(self.names) if g is None else g
        self.model.base_model.set_adapter(self.names[:g], inference_mode=True)

    @contextlib.contextmanager
    def level(self, g: int):
        """Within the block, the network is z_g: the base plus adapters 1..g (g = 0: the base)."""
        try:
            if g == 0:
                with self.model.disable_adapter():
                    yield
            else:
                self.activate(g)
                yield
        finally:
            self.activate(len(self.names))

    def _strengths(self, strengths, field: str = "strengths") -> list[float]:
        """The strengths to decode at: THE strength rule (:func:`qadapter.settings.strength_values`)."""
        return strength_values(strengths, len(self.names), field) or self.strengths

    def branch_logits(self, input_ids, attention_mask=None, positions=None) -> list[torch.Tensor]:
        """[z_0, ..., z_k], each (B, T, V) float32: k+1 passes of one network."""
        out = []
        for g in range(len(self.names) + 1):
            with self.level(g):
                out.append(causal_lm_logits(self.model, input_ids, attention_mask, positions).float())
        return out

    def logits(self, input_ids, attention_mask=None, *, strengths=None, positions=None) -> torch.Tensor:
        """Next-token logits of the stacked policy: (B, T, V). At all strengths 1 this is one pass
        (z_k, the network with every adapter); otherwise k+1 passes composed by :func:`stack_logits`."""
        strengths = self._strengths(strengths)
        if all(s == 1.0 for s in strengths):
            return causal_lm_logits(self.model, input_ids, attention_mask, positions).float()
        return stack_logits(self.branch_logits(input_ids, attention_mask, positions), strengths)

    def base_logits(self, input_ids, attention_mask=None, positions=None) -> torch.Tensor:
        """Next-token logits of the original base model (every adapter disabled)."""
        with self.level(0):
            return causal_lm_logits(self.model, input_ids, attention_mask, positions)

    # the same scoring code as a single Q-Adapter ("adapter" scores z_k, the network with every LoRA)
    score = QAdapter.score
    _score_ids = QAdapter._score_ids

    @torch.no_grad()
    def generate(self, prompts, *, strength=None, strengths=None, fast: bool = True, policy: str = "customized",
                 **kwargs):
        """Generate from the stacked policy (the arguments of :func:`qadapter.generation.generate`, plus
        ``strength``: one number for every adapter or one per adapter, THE strength rule of
        :func:`qadapter.settings.strength_values`; ``strengths`` is the same argument under its older
        name). ``fast``: one forward per token for all k+1 branches (:class:`StackFastEngine`)."""
        if strength is not None and strengths is not None:
            raise ValueError("give strength or strengths (the same rule), not both")
        strengths = self._strengths(strengths if strength is None else strength,
                                    "strength" if strength is not None else "strengths")
        for key in ("alpha_0", "alpha_tilde", "parameterization", "q_scale"):
            if kwargs.pop(key, None) is not None:
                raise ValueError(f"{key} does not apply to a stack: give strength=s (every adapter) or "
                                 "strength=[s_1, ..., s_k]")
        def engine(batch_size: int):
            return stack_engine(self, policy, strengths, batch_size, fast=fast)

        return _generate(self.model, self.tokenizer, prompts, alpha_0=1.0, alpha_tilde=1.0, policy=policy,
                         engine_factory=engine, **kwargs)


# --------------------------------------------------------------------------------------- decoding
def _levels_needed(policy: str, k: int, strengths: Sequence[float]) -> list[int]:
    """Which branches z_g the policy needs: all k+1 in general; z_k only at all strengths 1."""
    if policy == "base":
        return [0]
    if policy == "adapter" or all(s == 1.0 for s in strengths):
        return [k]
    return list(range(k + 1))


def stack_plan(stack: QAdapterStack):
    """Per LoRA layer, the plain LoRA Linears of the stack's adapters (or None where some layer is not
    plain: then decoding uses the reference engine)."""
    layers = {}
    for name in stack.names:
        plan, found = fast_plan(stack.model, name)
        if plan != "split":
            return None
        for module in found:
            layers.setdefault(id(module), (module, []))[1].append(name)
    return list(layers.values())


def _stack_rows_forward(module, adapters_from: Sequence[tuple[str, int]]):
    """A LoRA Linear forward where adapter ``name`` is added to rows ``start:`` for each (name, start)."""
    base_layer = module.base_layer
    parts = [(module.lora_A[n], module.lora_B[n], module.scaling[n], start) for n, start in adapters_from]

    def forward(x, *args, **kwargs):
        result = base_layer(x, *args, **kwargs)
        for lora_A, lora_B, scaling, start in parts:
            rows = x[start:]
            if rows.shape[0] == 0:
                continue
            delta = lora_B(lora_A(rows.to(lora_A.weight.dtype))) * scaling
            result[start:] += delta.to(result.dtype)
        return result

    return forward


class StackFastEngine(Engine):
    """One forward per token for every branch the policy needs, one KV cache: row group g (rows
    g·B..(g+1)·B−1) is z_{levels[g]}, i.e. the base plus the deltas of adapters 1..levels[g]."""

    def __init__(self, stack: QAdapterStack, policy: str, strengths, batch_size: int, compose=None):
        super().__init__(stack.model, policy, 1.0, 1.0, compose=compose)
        self.stack, self.B, self.strengths = stack, batch_size, list(strengths)
        self.levels = _levels_needed(policy, len(stack.names), strengths)
        self.G = len(self.levels)
        self.cache = new_cache(self.inner)
        plan = stack_plan(stack)
        index = {n: i + 1 for i, n in enumerate(stack.names)}
        self.forwards = []
        for module, names in plan:
            adapters_from = []
            for n in names:  # adapter j enters every group whose level is >= j
                first = next((g for g, lv in enumerate(self.levels) if lv >= index[n]), None)
                if first is not None:
                    adapters_from.append((n, first * self.B))
            self.forwards.append((module, _stack_rows_forward(module, adapters_from)))

    def _forward(self, ids, mask, positions):
        try:
            for module, forward in self.forwards:
                module.forward = forward
            out = self.inner(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self.cache_kw: self.cache})
        finally:
            for module, _ in self.forwards:
                module.__dict__.pop("forward", None)
        logits = out.logits[:, -1].float()
        groups = [logits[g * self.B:(g + 1) * self.B] for g in range(self.G)]
        return self._compose(groups)

    def _compose(self, groups):
        """The policy's logits from the branches z_{levels[0]}, ... (or, with a ``compose`` given, what
        it makes of them: e.g. each row at its own strengths)."""
        if self.composer is not None:
            return self.composer(*groups)
        if self.G == 1:
            return groups[0]
        return stack_logits(groups, self.strengths)

    def prefill(self, input_ids, attention_mask, total_len):
        mask, positions = self._buffers(attention_mask, total_len, self.G)
        return self._forward(input_ids.repeat(self.G, 1), mask, positions)

    def step(self, tokens):
        mask, positions = self._advance()
        return self._forward(tokens.repeat(self.G)[:, None], mask, positions)


class StackReferenceEngine(StackFastEngine):
    """k+1 separate forwards per token through the public PEFT model (each level's adapters made
    active with ``set_adapter``), one KV cache per branch."""

    def __init__(self, stack: QAdapterStack, policy: str, strengths, batch_size: int, compose=None):
        Engine.__init__(self, stack.model, policy, 1.0, 1.0, compose=compose)
        self.stack, self.B, self.strengths = stack, batch_size, list(strengths)
        self.levels = _levels_needed(policy, len(stack.names), strengths)
        self.G = len(self.levels)
        self.caches = [new_cache(self.inner) for _ in self.levels]

    def _all(self, ids, mask, positions):
        groups = []
        for level, cache in zip(self.levels, self.caches):
            with self.stack.level(level):
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 logits_to_keep=1, **{self.cache_kw: cache})
            groups.append(out.logits[:, -1].float())
        return self._compose(groups)

    def prefill(self, input_ids, attention_mask, total_len):
        mask, positions = self._buffers(attention_mask, total_len, 1)
        return self._all(input_ids, mask, positions)

    def step(self, tokens):
        mask, positions = self._advance()
        return self._all(tokens[:, None], mask, positions)


def stack_engine(stack: QAdapterStack, policy: str, strengths: Sequence[float], batch_size: int, *,
                 fast: bool = True, compose=None) -> Engine:
    """The engine that decodes ``batch_size`` rows of ``stack`` (:class:`StackFastEngine`, or the
    reference engine where some LoRA layer is not plain). The strengths choose the branches (all 1:
    z_k alone); ``compose(*branches)``, if given, makes the logits from the raw branches instead
    (e.g. :func:`qadapter.generation.row_composer`: each row at its own strengths)."""
    # only the stack's adapters active: a LoRA layer the fast engine does not replace (it holds none
    # of the stack's adapters) must not apply another adapter of the same PeftModel
    stack.activate()
    cls = StackFastEngine if fast and stack_plan(stack) is not None else StackReferenceEngine
    return cls(stack, policy, strengths, batch_size, compose)


def load_stack_or_adapter(path, **kwargs):
    """A :class:`QAdapterStack` for a stack folder, a :class:`QAdapter` for a single Q-Adapter folder."""
    if (Path(path) / STACK_CONFIG).is_file():
        return QAdapterStack.from_pretrained(path, **kwargs)
    return QAdapter.from_pretrained(path, **kwargs)
