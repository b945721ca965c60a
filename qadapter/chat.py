"""The one place a prompt becomes chat messages, chat text or token ids.

A prompt is a string (one user turn), a list of message dicts (a conversation), or a sequence of
token ids (used as is). Without a chat template, messages render as ``Role: content`` lines,
ending in ``Assistant:`` when a generation prompt is asked for (the same fallback everywhere:
generation, scoring, the evaluators, the server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ChatFormat:
    """A chat rendering for a model that has no chat template of its own (a pretrained model), as a
    Jinja chat template, and the token that ends an assistant turn in it (None: the tokenizer's
    end-of-sequence token)."""

    template: str
    end_of_turn: str | None = None


#: Chat renderings :func:`set_chat_format` writes into a tokenizer without a chat template.
#: ``gemma``: Gemma's own turn format (``<start_of_turn>``/``<end_of_turn>`` are single special tokens
#: of its vocabulary; a system message opens the first user turn, as Gemma's instruct template does;
#: the assistant's role is ``model``). ``plain``: ``Role: content`` lines (the fallback
#: :func:`render_messages` uses for any tokenizer without a template), an assistant turn ended by
#: the end-of-sequence token. Both start with the BOS token. Why Gemma 3 270M uses ``plain``:
#: docs/models.md, "Chat rendering".
CHAT_FORMATS = {
    "gemma": ChatFormat(
        template=("{{ bos_token }}"
                  "{% set system = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == 'system' else '' %}"
                  "{% for m in messages if m['role'] != 'system' %}"
                  "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                  "{{ system if loop.first else '' }}{{ m['content'] | trim }}<end_of_turn>\n"
                  "{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
        end_of_turn="<end_of_turn>"),
    "plain": ChatFormat(
        template=("{{ bos_token }}"
                  "{% for m in messages %}{{ '\\n' if not loop.first else '' }}{{ m['role'] | capitalize }}: "
                  "{{ m['content'] | trim }}{{ eos_token if m['role'] == 'assistant' else '' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '\\n' }}Assistant:{% endif %}")),
}


def set_chat_format(tokenizer, name: str, generation_config=None) -> None:
    """Give ``tokenizer`` the chat rendering ``CHAT_FORMATS[name]``: its template, and its
    end-of-turn token as ``tokenizer.eos_token`` (what the pair tokenizer ends a response with)
    and among ``generation_config.eos_token_id`` (where decoding stops), beside the model's own."""
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {name!r}: choose one of {', '.join(CHAT_FORMATS)}")
    chat_format = CHAT_FORMATS[name]
    tokenizer.chat_template = chat_format.template
    if chat_format.end_of_turn is None:
        return
    end = tokenizer.convert_tokens_to_ids(chat_format.end_of_turn)
    if end is None or end == tokenizer.unk_token_id:
        raise ValueError(f"chat format {name!r}: the vocabulary has no {chat_format.end_of_turn} token")
    tokenizer.eos_token = chat_format.end_of_turn
    if generation_config is not None:
        ids = generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        generation_config.eos_token_id = ids + [end] if end not in ids else ids


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


def bos_prefix(tokenizer) -> list[int]:
    """The BOS id when ``tokenizer`` starts a text with it by default (Gemma's ``<bos>``, without
    which Gemma's predictions fall apart), else nothing (SmolLM2's tokenizer adds none): what a
    sequence of raw text begins with, as ``tokenizer(text)``, vLLM and lm-eval (for Gemma) begin it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer("a")["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def raw_text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of raw text (no chat template) at the start of a sequence: :func:`bos_prefix`, then
    the text tokenized without special tokens."""
    return bos_prefix(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, prompt, raw_text: bool = False) -> list[int]:
    """Token ids of one prompt.

    Token ids are used as they are; a list of message dicts is rendered with the chat template and
    the generation prompt; a string is one user turn (with ``raw_text=True``: raw text,
    :func:`raw_text_ids`; with a tokenizer that has no chat template: plain text, with the
    tokenizer's usual special tokens, e.g. BOS).
    """
    if is_ids(prompt):
        return [int(t) for t in prompt]
    if isinstance(prompt, str):
        if raw_text:
            return raw_text_ids(tokenizer, prompt)
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
