"""One loader: what a folder is, and the settings it decodes at.

A folder is one of four kinds, told apart by the file it holds (:data:`KINDS`, first match wins):

* ``stack``: ``qadapter_stack.json``, adapters trained one on another (:class:`~qadapter.stack.QAdapterStack`);
* ``qadapter``: ``qadapter_config.json``, one Q-Adapter (:class:`~qadapter.modeling.QAdapter`);
* ``peft``: ``adapter_config.json`` only, a plain PEFT LoRA (an SFT / DPO baseline), a ``PeftModel``;
* ``model``: anything else, a model folder, hub id or embedded name, a plain transformers model.

The decoding settings are applied here, once, to the loaded policy, so that its own ``generate``,
``logits`` and ``score`` use them: ``strength`` follows THE strength rule
(:func:`qadapter.settings.strength_values`: one number sets every adapter of a stack, one number per
adapter sets each, any other count is an error naming the flag or field); ``alpha_0`` / ``alpha_tilde``
override a Q-Adapter's saved α's (exclusive with ``strength``; they do not apply to a stack). The
callers: ``qadapter generate`` / ``chat``, the server (:mod:`qadapter.server.models`),
:func:`qadapter.evaluation.load_policy` and :mod:`qadapter.export`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .settings import CONFIG_NAME, strength_values
from .stack import PEFT_CONFIG, STACK_CONFIG, QAdapterStack, StackSpec, load_base, read_stack

#: (kind, the file that makes a folder that kind), in the order they are tried
KINDS = (("stack", STACK_CONFIG), ("qadapter", CONFIG_NAME), ("peft", PEFT_CONFIG))

__all__ = ["KINDS", "Loaded", "folder_kind", "load", "apply_decoding", "read_folder", "load_base",
           "strength_values"]


def folder_kind(path: str | os.PathLike) -> str:
    """``"stack"``, ``"qadapter"``, ``"peft"`` or ``"model"`` (module docstring)."""
    path = Path(str(path))
    return next((kind for kind, marker in KINDS if (path / marker).is_file()), "model")


def read_folder(path: str | os.PathLike, strength=None, field: str = "strength") -> tuple[StackSpec, list[float]]:
    """A stack, Q-Adapter or PEFT LoRA folder read as a stack without loading a model, and the
    strengths to use under THE strength rule (default: the saved ones)."""
    spec = read_stack(path)
    return spec, strength_values(strength, len(spec.folders), field) or spec.strengths


@dataclass
class Loaded:
    """What :func:`load` found: the kind, and the policy (a QAdapter or QAdapterStack; None for a
    plain PEFT LoRA or model, which ``model`` and ``tokenizer`` hold)."""

    kind: str
    model: object
    tokenizer: object
    policy: object | None = None
    name: str = ""


def apply_decoding(policy, *, strength=None, alpha_0: float | None = None, alpha_tilde: float | None = None,
                   field: str = "strength", name: str = "this folder"):
    """Set the decoding settings of a loaded QAdapter or QAdapterStack (in place; returns it)."""
    given = [n for n, v in ((field, strength), ("alpha_0", alpha_0), ("alpha_tilde", alpha_tilde)) if v is not None]
    if isinstance(policy, QAdapterStack):
        if alpha_0 is not None or alpha_tilde is not None:
            raise UserError(f"alpha_0 / alpha_tilde do not apply to {name}, a stack of {len(policy)} adapters: give "
                             f"{field} (one value for every adapter, or one per adapter)")
        policy.strengths = strength_values(strength, len(policy), field) or policy.strengths
        return policy
    if policy is None or not hasattr(policy, "settings"):
        if given:
            raise UserError(f"{given[0]} applies to a Q-Adapter or a stack; {name} is neither")
        return policy
    one = strength_values(strength, 1, field)
    try:
        a0, at = policy.settings.decoding_alphas(alpha_0, alpha_tilde, None if one is None else one[0])
    except ValueError as exc:
        raise UserError(f"{given[0] if given else field}: {exc}") from None
    policy.settings = dataclasses.replace(policy.settings, alpha_0=a0, alpha_tilde=at)
    return policy


def _load_stack(path, base_model, torch_dtype, trust_remote_code):
    stack = QAdapterStack.from_pretrained(path, base_model=base_model, torch_dtype=torch_dtype)
    return Loaded("stack", stack.model, stack.tokenizer, stack, str(path))


def _load_qadapter(path, base_model, torch_dtype, trust_remote_code):
    from .modeling import QAdapter

    qa = QAdapter.from_pretrained(path, base_model=base_model, torch_dtype=torch_dtype,
                                  trust_remote_code=trust_remote_code)
    return Loaded("qadapter", qa.model, qa.tokenizer, qa, str(path))


def _load_peft(path, base_model, torch_dtype, trust_remote_code):
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    from .embedded import load_model, resolve_model_path

    config = PeftConfig.from_pretrained(str(path))
    base_path = resolve_model_path(base_model or config.base_model_name_or_path)
    base = load_model(base_path, dtype=torch_dtype)
    tok_source = path if (Path(path) / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source))
    return Loaded("peft", PeftModel.from_pretrained(base, str(path)), tokenizer, None, str(path))


def _load_model(path, base_model, torch_dtype, trust_remote_code):
    from .embedded import load_model, load_tokenizer, resolve_model_path

    model_path = resolve_model_path(str(path))
    return Loaded("model", load_model(model_path, dtype=torch_dtype), load_tokenizer(model_path), None, str(path))


LOADERS = {"stack": _load_stack, "qadapter": _load_qadapter, "peft": _load_peft, "model": _load_model}


def load(path_or_name: str | os.PathLike, *, base_model=None, device: str | None = None, torch_dtype=None,
         trust_remote_code: bool = False, strength=None, alpha_0: float | None = None,
         alpha_tilde: float | None = None, field: str = "strength", kinds=tuple(LOADERS)) -> Loaded:
    """Load whatever ``path_or_name`` is (:func:`folder_kind`) onto ``device`` in eval mode, with the
    decoding settings applied (:func:`apply_decoding`; ``field`` names where ``strength`` came from in
    errors, e.g. ``"--strength"``). They are checked before any weights are read where the folder
    says enough (a stack's adapter count). ``kinds``: the kinds the caller accepts (others are a
    :class:`~qadapter.errors.UserError` naming the folder, before anything loads)."""
    kind = folder_kind(path_or_name)
    if kind not in kinds:
        where = Path(str(path_or_name))
        markers = " or ".join(marker for k, marker in KINDS if k in kinds)
        raise UserError(f"{where}: no such folder" if not where.exists() else
                        f"{where} holds no {markers}: is it a folder saved by qadapter?")
    if kind == "stack":  # a wrong count fails fast, before the base model loads
        read_folder(path_or_name, strength, field)
    if kind in ("peft", "model"):
        apply_decoding(None, strength=strength, alpha_0=alpha_0, alpha_tilde=alpha_tilde, field=field,
                       name=f"{path_or_name} (a plain {'PEFT LoRA' if kind == 'peft' else 'model'})")
    loaded = LOADERS[kind](path_or_name, base_model, torch_dtype, trust_remote_code)
    apply_decoding(loaded.policy, strength=strength, alpha_0=alpha_0, alpha_tilde=alpha_tilde, field=field,
                   name=str(path_or_name))
    if device:
        loaded.model.to(device)
    loaded.model.eval()
    return loaded
