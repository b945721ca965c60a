"""The one place a prompt becomes chat messages, chat text or token ids.

A prompt is a string (one user turn), a list of message dicts (a conversation), or a sequence of
token ids (used as is). Without a chat template, messages render as ``Role: content`` lines,
ending in ``Assistant:`` when a generation prompt is asked for (the same fallback everywhere:
generation, scoring, the evaluators, the server).
"""

from __future__ import annotations

from typing import Any

import torch


def as_messages(prompt: Any) -> list[dict[str, str]]:
    """A string as one user turn; a conversation (a sequence of message dicts) as a new list."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def is_messages(obj) -> bool:
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(m, dict) for m in obj)


def is_ids(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.dim() == 1
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(t, int) for t in obj)


def normalize_prompts(prompts) -> list:
    """One prompt or a batch of them -> a list of prompts.

    A prompt is a string (one user turn), a list of message dicts (a conversation), or a sequence
    of token ids (used as is). A 2-D tensor is a batch of unpadded id rows.
    """
    if isinstance(prompts, str) or is_messages(prompts) or is_ids(prompts):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"a tensor of prompt ids must be 1-D or 2-D, got shape {tuple(prompts.shape)}")
        return list(prompts)
    if isinstance(prompts, (list, tuple)) and len(prompts) > 0:
        for p in prompts:
            if not (isinstance(p, str) or is_messages(p) or is_ids(p)):
                raise TypeError(f"cannot read a prompt of type {type(p).__name__}: give a string, a list of "
                                "message dicts or a list of token ids")
        return list(prompts)
    raise TypeError("prompts must be a string, a list of message dicts, token ids, or a non-empty list of these")


def render_messages(tokenizer, messages) -> str:
    """The chat template with the generation prompt; without a template, ``Role: content`` lines
    ending in ``Assistant:`` (the same fallback as :mod:`qadapter.evaluation`)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return text if isinstance(text, str) else text[0]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\nAssistant:"


def encode_prompt(tokenizer, prompt, raw_text: bool = False) -> list[int]:
    """Token ids of one prompt.

    Token ids are used as they are; a list of message dicts is rendered with the chat template and
    the generation prompt; a string is one user turn (with ``raw_text=True``: text tokenized as is,
    without special tokens; with a tokenizer that has no chat template: plain text, with the
    tokenizer's usual special tokens, e.g. BOS).
    """
    if is_ids(prompt):
        return [int(t) for t in prompt]
    if isinstance(prompt, str):
        if raw_text:
            return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not getattr(tokenizer, "chat_template", None):
            return list(tokenizer(prompt)["input_ids"])
        prompt = as_messages(prompt)
    return list(tokenizer(render_messages(tokenizer, prompt), add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- text helpers
def render_chat(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    """The chat template as text (:func:`render_messages` with the generation prompt); without a
    template, ``Role: content`` lines (ending in ``Assistant:`` with the prompt)."""
    if add_generation_prompt:
        return render_messages(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=False)
        return text if isinstance(text, str) else text[0]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
