"""The one interface every evaluated policy goes through.

A *policy* is anything with

* ``tokenizer`` — a Hugging Face tokenizer,
* ``device`` — where its inputs must live,
* ``logits(input_ids, attention_mask)`` — next-token logits (B, T, V) of the policy for a left-padded
  batch (optionally ``positions=K``: only the last K positions, (B, K, V)),
* ``generate(prompts, *, max_new_tokens, stop_strings=None, do_sample=False, raw_text=False)`` — one
  continuation per prompt, the new text only (special tokens skipped). Prompts follow
  :func:`qadapter.generation.generate`: a list of ``{"role", "content"}`` messages is rendered with
  the chat template and the generation prompt; a ``str`` is one user turn, or with ``raw_text=True``
  raw text (no chat template; only the BOS a tokenizer like Gemma's starts every text with,
  :func:`qadapter.chat.raw_text_ids`); a list of ints is token ids.

:class:`qadapter.modeling.QAdapter` is one (π̃ of eq. (1)); :class:`HFPolicy` wraps any plain causal LM
(SFT, DPO, a PEFT model, the base model itself). Every evaluator in :mod:`qadapter.evaluation` only
uses this interface, so all policies are scored by the same code. The evaluators pass benchmark
prompts as raw text (``raw_text=True``) and chat prompts as message lists.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from ..backbone import pad_token_id
from ..chat import encode_prompt
from ..generation import left_pad

__all__ = ["Policy", "HFPolicy", "QAdapterBaseView", "base_policy", "load_policy", "encode",
           "cut_at_stop", "call_logits"]


@runtime_checkable
class Policy(Protocol):
    """What the evaluators need from a policy (see the module docstring for the semantics)."""

    tokenizer: Any

    @property
    def device(self) -> torch.device: ...

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def generate(self, prompts: Sequence[Any], *, max_new_tokens: int, stop_strings: Sequence[str] | None = None,
                 **kwargs) -> list[str]: ...


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (the text carries its own, e.g. from a template)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_at_stop(text: str, stop_strings: Sequence[str] | None) -> str:
    """``text`` up to (excluding) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings or ():
        if stop:
            found = text.find(stop)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


_ACCEPTS_POSITIONS: dict[type, bool] = {}


def call_logits(policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int | None = None) -> torch.Tensor:
    """``policy.logits`` at the last ``keep_last`` positions (all when None), as float32.

    Policies whose ``logits`` take ``positions=`` (QAdapter, HFPolicy) compute only those positions'
    vocabulary projections; others are sliced afterwards.
    """
    kind = type(policy)
    if kind not in _ACCEPTS_POSITIONS:
        try:
            params = inspect.signature(policy.logits).parameters
            _ACCEPTS_POSITIONS[kind] = "positions" in params
        except (TypeError, ValueError):
            _ACCEPTS_POSITIONS[kind] = False
    if keep_last is not None and keep_last >= input_ids.shape[1]:
        keep_last = None
    if keep_last is not None and _ACCEPTS_POSITIONS[kind]:
        out = policy.logits(input_ids, attention_mask, positions=int(keep_last))
    else:
        out = policy.logits(input_ids, attention_mask)
        if keep_last is not None:
            out = out[:, -keep_last:]
    return out.float()


# --------------------------------------------------------------------------- HF policies
class HFPolicy:
    """Any causal LM (a ``transformers`` model or a ``peft.PeftModel``) as a :class:`Policy`.

    ``logits`` runs the model on a left-padded batch with position ids derived from the attention mask
    (so padding never shifts positions); ``generate`` uses ``model.generate`` (greedy by default).
    With ``disable_adapter=True`` (a PEFT model only) both run with the adapter switched off: the
    base model without loading it twice (see :func:`base_policy`).
    """

    def __init__(self, model, tokenizer, *, disable_adapter: bool = False, name: str | None = None):
        if disable_adapter and not hasattr(model, "disable_adapter"):
            raise ValueError("disable_adapter=True needs a PEFT model")
        self.model = model
        self.tokenizer = tokenizer
        self.disable_adapter = disable_adapter
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        self.model.eval()

    def __repr__(self) -> str:
        return f"HFPolicy({self.name!r}{', adapter disabled' if self.disable_adapter else ''})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _context(self):
        return self.model.disable_adapter() if self.disable_adapter else contextlib.nullcontext()

    @torch.no_grad()
    def logits(self, input_ids, attention_mask=None, positions=None) -> torch.Tensor:
        from ..backbone import causal_lm_logits

        with self._context():
            return causal_lm_logits(self.model, input_ids, attention_mask, positions)

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens: int = 128, stop_strings: Sequence[str] | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float | None = None,
                 top_k: int | None = None, raw_text: bool = False, **kwargs) -> list[str]:
        """``model.generate`` (greedy unless ``do_sample``) on prompts read as
        :func:`qadapter.generation.generate` reads them; the new text, cut before a stop string."""
        if not prompts:
            return []
        tok = self.tokenizer
        ids, mask = left_pad([encode_prompt(tok, p, raw_text) for p in prompts], pad_token_id(tok), self.device)
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                          pad_token_id=pad_token_id(tok))
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:  # neutralize sampling settings a model's generation_config may carry
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        stops = [s for s in ([stop_strings] if isinstance(stop_strings, str) else stop_strings or ()) if s]
        if stops:
            gen_kwargs.update(stop_strings=stops, tokenizer=tok)
        gen_kwargs.update(kwargs)
        with self._context():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
        texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return [cut_at_stop(t, stops) for t in texts]


class QAdapterBaseView:
    """The base policy π1 of a :class:`~qadapter.modeling.QAdapter` (adapter disabled), as a Policy."""

    def __init__(self, qadapter):
        self.qadapter = qadapter
        self.tokenizer = qadapter.tokenizer

    def __repr__(self) -> str:
        name = getattr(self.qadapter, "base_model_name_or_path", None)  # a QAdapterStack
        return f"QAdapterBaseView({name or self.qadapter.settings.base_model_name_or_path!r})"

    @property
    def device(self) -> torch.device:
        return self.qadapter.device

    @torch.no_grad()
    def logits(self, input_ids, attention_mask=None, positions=None) -> torch.Tensor:
        return self.qadapter.base_logits(input_ids, attention_mask, positions)

    @torch.no_grad()
    def generate(self, prompts, **kwargs) -> list[str]:
        kwargs["policy"] = "base"
        return self.qadapter.generate(prompts, **kwargs)


def base_policy(policy) -> Any:
    """π1 sharing the weights of ``policy``: the adapter-disabled view of a QAdapter or a PEFT HFPolicy.

    For a plain (merged / fully fine-tuned) model the base cannot be inferred: load it with
    :func:`load_policy` and pass it explicitly.
    """
    from ..modeling import QAdapter
    from ..stack import QAdapterStack

    if isinstance(policy, (QAdapter, QAdapterStack)):
        return QAdapterBaseView(policy)
    if isinstance(policy, QAdapterBaseView):
        return policy
    if isinstance(policy, HFPolicy) and hasattr(policy.model, "disable_adapter"):
        return HFPolicy(policy.model, policy.tokenizer, disable_adapter=True, name=f"{policy.name} (base)")
    raise ValueError(f"cannot infer the base model of {policy!r}: load it with load_policy() and pass it explicitly")


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    name = str(dtype).replace("torch.", "")
    if name == "auto":
        return "auto"
    return getattr(torch, name)


def load_policy(path_or_name: str | os.PathLike, *, base_model: str | None = None, device: str | None = None,
                dtype=None, alpha_0: float | None = None, alpha_tilde: float | None = None,
                strength=None, strengths=None):
    """Load any evaluated policy from a folder or model name (one loader: :func:`qadapter.loading.load`).

    * a stack folder (``qadapter_stack.json``) → :class:`~qadapter.stack.QAdapterStack` (``base_model``:
      the ORIGINAL base);
    * a folder with ``qadapter_config.json`` → :class:`~qadapter.modeling.QAdapter` (``alpha_0`` /
      ``alpha_tilde`` override the saved decoding temperatures; ``base_model`` the base it loads onto);
    * a folder with ``adapter_config.json`` (a PEFT adapter, e.g. SFT / DPO LoRA) → :class:`HFPolicy`
      over ``PeftModel`` on its base (``base_model`` or the adapter's ``base_model_name_or_path``);
    * anything else (a model folder, a hub id, ``"embedded"``) → :class:`HFPolicy` over the model.

    ``strength`` follows THE strength rule (:func:`qadapter.settings.strength_values`): one number sets
    every adapter of a stack (or a Q-Adapter's strength), one number per adapter sets each; any other
    count is a ValueError. ``strengths`` is the same argument under its older name.
    """
    from ..loading import load

    if strength is not None and strengths is not None:
        raise ValueError("give strength or strengths (the same rule), not both")
    field = "strengths" if strengths is not None else "strength"
    loaded = load(path_or_name, base_model=base_model, device=device, torch_dtype=_dtype(dtype),
                  strength=strength if strength is not None else strengths, alpha_0=alpha_0,
                  alpha_tilde=alpha_tilde, field=field)
    if loaded.policy is not None:
        return loaded.policy
    return HFPolicy(loaded.model, loaded.tokenizer, name=loaded.name)
