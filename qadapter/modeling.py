"""The model: one set of weights serves both π1 and Q̂.

zθ = the logits of the causal LM *with* a PEFT LoRA adapter, z1 = those of the same model with the
adapter disabled (computed without gradient), log π1 = log-softmax(z1); Q̂ = q_scale·(zθ − z1)
(``residual``, the default) or zθ (``full``, the authors' code). :class:`QAdapter` is the
customized policy π̃ of eq. (1): it scores text and generates through the composed logits, and it
saves to / loads from a folder that PEFT itself can load, plus ``qadapter_config.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .backbone import base_fingerprint, causal_lm_logits, check_target_modules, lora_config, pad_token_id
from .chat import as_messages
from .errors import UserError
from .io import save_atomically
from .objective import q_values
from .settings import CONFIG_NAME, QAdapterSettings

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
        from transformers import AutoTokenizer

        from .integrity import verify_folder

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
            from .embedded import load_model, load_tokenizer

            base_model = load_model(name, revision=settings.base_model_revision if base_model is None else None,
                                    dtype=torch_dtype or torch.float32, trust_remote_code=trust_remote_code)
            tokenizer = tokenizer or load_tokenizer(name, trust_remote_code=trust_remote_code)
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
            self.settings.save(folder)

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
            prompt = as_messages(prompt)
            completion = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
            ids = tokenize_pair(prompt, completion, completion, self.tokenizer, max_length=10**9)
            rows.append((ids["prompt_input_ids"], ids["chosen_input_ids"]))
        return self._score_ids(rows, policy, batch_size) if rows else []

    def _score_ids(self, rows, policy: str, batch_size: int = 8) -> list[float]:
        """Summed log π(response | prompt) of (prompt ids, response ids) rows, by :func:`qadapter.scoring.score`."""
        from .scoring import score

        if policy not in ("customized", "base", "adapter"):
            raise ValueError(f"policy must be 'customized', 'base' or 'adapter', got {policy!r}")
        pad = pad_token_id(self.tokenizer)
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
