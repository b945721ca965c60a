"""Pairwise judges for win rates: ``judge(prompt, answer_a, answer_b) -> P(a is better)``."""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from ..backbone import pad_token_id
from ..chat import as_messages, render_chat

__all__ = ["Judge", "ConstantJudge", "RewardModelJudge", "judge_many"]


@runtime_checkable
class Judge(Protocol):
    """A pairwise judge: called as ``judge(prompt, answer_a, answer_b)``, it returns the probability
    (0..1) that ``answer_a`` is the better answer to ``prompt`` (a ``str`` user turn or a message
    list); 0.5 is a tie. A judge may also offer ``judge_batch(prompts, answers_a, answers_b)``."""

    def __call__(self, prompt: Any, answer_a: str, answer_b: str) -> float: ...


def judge_many(judge, prompts: Sequence[Any], answers_a: Sequence[str], answers_b: Sequence[str]) -> list[float]:
    """``judge`` on every triple, through its ``judge_batch`` when it has one."""
    if hasattr(judge, "judge_batch"):
        out = list(judge.judge_batch(list(prompts), list(answers_a), list(answers_b)))
    else:
        out = [judge(p, a, b) for p, a, b in zip(prompts, answers_a, answers_b)]
    for p in out:
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"a judge must return a probability in [0, 1], got {p}")
    # Identical answers are a tie by definition: a reward model scoring the same text in two batches
    # of different padding can differ in the last bits and would otherwise call a winner.
    return [0.5 if a == b else float(p) for p, a, b in zip(out, answers_a, answers_b)]


class ConstantJudge:
    """Always returns ``p`` (1.0: a always wins; 0.0: b always wins; 0.5: always a tie). For tests."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, prompt, answer_a, answer_b) -> float:
        return self.p

    def __repr__(self) -> str:
        return f"ConstantJudge({self.p})"


class RewardModelJudge:
    """Compare two answers with a reward model (any ``AutoModelForSequenceClassification``).

    Each answer is scored as ``prompt messages + {"role": "assistant", "content": answer}`` rendered
    with the reward model's own chat template (plain ``User:/Assistant:`` lines if it has none); the
    reward is the logit of ``label_index`` (the only one for the usual one-logit reward models).
    ``soft=False`` (default): 1 if a's reward is higher, 0 if lower, 0.5 if equal;
    ``soft=True``: the Bradley–Terry probability ``sigmoid((r_a − r_b) / temperature)``.
    Sequences longer than ``max_length`` tokens lose tokens on the left (the answer's end is kept).
    """

    def __init__(self, model, tokenizer=None, *, soft: bool = False, temperature: float = 1.0, label_index: int = 0,
                 max_length: int = 2048, batch_size: int = 8, device: str | None = None, dtype=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype or torch.float32)
        if tokenizer is None:
            raise ValueError("pass the reward model's tokenizer")
        if device:
            model.to(device)
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self.soft, self.temperature, self.label_index = soft, temperature, label_index
        self.max_length, self.batch_size = max_length, batch_size
        pad = pad_token_id(tokenizer)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = pad
        self._pad = pad if pad is not None else 0

    def _text(self, prompt, answer: str) -> str:
        messages = as_messages(prompt)
        return render_chat(self.tokenizer, messages + [{"role": "assistant", "content": answer}],
                           add_generation_prompt=False)

    @torch.no_grad()
    def rewards(self, prompts: Sequence[Any], answers: Sequence[str]) -> list[float]:
        """The reward of each (prompt, answer)."""
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        rows = [list(self.tokenizer(self._text(p, a), add_special_tokens=not templated)["input_ids"])[-self.max_length:]
                for p, a in zip(prompts, answers)]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(batch):  # right padding: sequence classifiers read the last real token
                ids[i, :len(r)] = torch.as_tensor(r)
                mask[i, :len(r)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            out.extend(logits[:, self.label_index].float().tolist())
        return out

    def _prob(self, r_a: float, r_b: float) -> float:
        if self.soft:
            return 1.0 / (1.0 + math.exp(-(r_a - r_b) / self.temperature))
        return 1.0 if r_a > r_b else 0.0 if r_a < r_b else 0.5

    def judge_batch(self, prompts, answers_a, answers_b) -> list[float]:
        r = self.rewards(list(prompts) * 2, list(answers_a) + list(answers_b))
        n = len(answers_a)
        return [self._prob(a, b) for a, b in zip(r[:n], r[n:])]

    def __call__(self, prompt, answer_a: str, answer_b: str) -> float:
        return self.judge_batch([prompt], [answer_a], [answer_b])[0]
