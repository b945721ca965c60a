"""lm-evaluation-harness integration: the ``qadapter`` model type, without forking the harness.

Importing this module registers ``qadapter`` with ``lm_eval.api.registry``. Its log-likelihood
requests are scored with the policy's own ``logits`` (for a Q-Adapter: the composed logits of
eq. (1)) and its ``generate_until`` requests go through the policy's ``generate`` (for a Q-Adapter:
``qadapter.generation``), so harness scores and :mod:`qadapter.evaluation` scores share one code path.

Model args (``--model_args``):

* ``pretrained`` — anything :func:`~qadapter.evaluation.policy.load_policy` accepts: a Q-Adapter folder
  (``qadapter_config.json``), a PEFT adapter folder, a model folder or name, ``embedded``;
* ``base_model`` — the base to load an adapter onto (default: the one recorded in the adapter);
* ``view`` — ``customized`` (default) or ``base`` (the adapter disabled: π1 from the same folder);
* ``alpha_0``, ``alpha_tilde`` — Q-Adapter decoding temperatures (default: the saved ones);
* ``batch_size``, ``max_length``, ``max_gen_toks``, ``device``, ``dtype``, ``add_bos_token`` (default: whether
  the tokenizer starts a text with BOS, :func:`qadapter.chat.bos_prefix`).

From the shell: ``qadapter-lm-eval --model qadapter --model_args pretrained=runs/qa --tasks mmlu``
(:func:`cli_main`: registers the model, then runs lm-eval's own CLI with the same arguments).
From Python: ``lm_eval.simple_evaluate(model=QAdapterLM(policy=my_policy), tasks=[...])``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Sequence

import lm_eval.models  # noqa: F401  (registers the built-in models; get_model only does it for an empty registry)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ..chat import bos_prefix
from .policy import base_policy, load_policy
from .scoring import continuation_logprobs, generate_texts

__all__ = ["QAdapterLM", "cli_main"]

log = logging.getLogger(__name__)


def _batch_size(value) -> int:
    if value is None:
        return 8
    if isinstance(value, str):
        if value.startswith("auto"):
            log.warning("qadapter: batch_size=auto is not supported; using 8")
            return 8
        return int(value)
    return int(value)


def _device(value: str | None) -> str | None:
    """lm-eval's CLI asks for ``cuda`` by default: fall back to the CPU where there is none."""
    import torch

    if value and str(value).startswith("cuda") and not torch.cuda.is_available():
        log.warning("qadapter: device %s requested but CUDA is not available; using the CPU", value)
        return "cpu"
    if value and str(value).startswith("mps") and not torch.backends.mps.is_available():
        log.warning("qadapter: device %s requested but MPS is not available; using the CPU", value)
        return "cpu"
    return value


@register_model("qadapter")
class QAdapterLM(TemplateLM):
    """Any :class:`~qadapter.evaluation.policy.Policy` (a Q-Adapter, an HF / PEFT model) as an lm-eval LM."""

    def __init__(self, pretrained: str | None = None, policy=None, base_model: str | None = None,
                 view: str = "customized", alpha_0: float | None = None, alpha_tilde: float | None = None,
                 batch_size: int | str | None = 8, max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, device: str | None = None, dtype: str | None = None,
                 add_bos_token: bool | None = None, strengths: str | None = None, **kwargs: Any):
        super().__init__()
        if kwargs:
            log.warning("qadapter: ignoring unsupported model args %s", sorted(kwargs))
        if policy is None:
            if pretrained is None:
                raise ValueError("give pretrained=<folder or model name> (or policy=<Policy> from Python)")
            # a stack folder's per-adapter strengths: strengths=0.5:1 (model_args are comma-separated)
            parsed = [float(x) for x in str(strengths).split(":")] if strengths not in (None, "") else None
            policy = load_policy(pretrained, base_model=base_model, device=_device(device), dtype=dtype,
                                 alpha_0=alpha_0, alpha_tilde=alpha_tilde, strengths=parsed)
        if view == "base":
            policy = base_policy(policy)
        elif view != "customized":
            raise ValueError(f"view must be 'customized' or 'base', got {view!r}")
        self.policy = policy
        self.tokenizer = policy.tokenizer
        self._device = policy.device
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        # default: as the tokenizer does (Gemma's adds a BOS, which its predictions need; SmolLM2's none)
        self.add_bos_token = bool(bos_prefix(self.tokenizer)) if add_bos_token is None else bool(add_bos_token)
        self._max_length = int(max_length) if max_length else None
        self.pretrained = pretrained

    # ----------------------------------------------------------------- tokenization
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        model = getattr(self.policy, "model", None) or getattr(getattr(self.policy, "qadapter", None), "model", None)
        config = getattr(model, "config", None)
        for attr in ("max_position_embeddings", "n_positions", "seq_length"):
            value = getattr(config, attr, None) if config is not None else None
            if value:
                return int(value)
        limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit) if limit and limit < 1_000_000 else 2048

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = list(self.tokenizer(string, add_special_tokens=special)["input_ids"])
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "qadapter")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ----------------------------------------------------------------- requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None, **kwargs):
        scores = continuation_logprobs(self.policy, [(ctx, cont) for _, ctx, cont in requests],
                                       batch_size=override_bs or self.batch_size, max_length=self.max_length,
                                       progress=not disable_tqdm, desc="loglikelihood")
        for (key, _, _), score in zip(requests, scores):
            if key is not None and key[0] is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owners, scores):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            do_sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
            extra: dict[str, Any] = {"do_sample": do_sample}
            if do_sample:
                extra["temperature"] = temperature
                if "top_p" in kwargs:
                    extra["top_p"] = float(kwargs.pop("top_p"))
            if kwargs:
                log.warning("qadapter: ignoring generation kwargs %s", sorted(kwargs))
            contexts = [self._fit_context(requests[i].args[0], max_new) for i in indices]
            texts = generate_texts(self.policy, contexts, max_new_tokens=max_new, stop_strings=until,
                                   batch_size=self.batch_size, progress=False, **extra)
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(indices))
        bar.close()
        return out  # type: ignore[return-value]

    def _fit_context(self, context: str, max_new: int) -> str:
        """Drop tokens on the left of a context that would not leave room for ``max_new`` tokens."""
        room = self.max_length - max_new
        ids = self.tok_encode(context)
        if room > 0 and len(ids) > room:
            log.warning("qadapter: context of %d tokens truncated to %d on the left", len(ids), room)
            return self.tokenizer.decode(ids[-room:], skip_special_tokens=False)
        return context


def cli_main(argv: Sequence[str] | None = None) -> None:
    """``qadapter-lm-eval``: lm-eval's own command line, with the ``qadapter`` model registered.

    Takes exactly lm-eval's arguments (``run`` / ``ls`` / ``validate`` sub-commands, or the legacy
    form without one), e.g. ``qadapter-lm-eval --model qadapter --model_args pretrained=runs/qa
    --tasks arc_easy --include_path examples/lm_eval_task``.
    """
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0] if saved else "qadapter-lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    cli_main()
