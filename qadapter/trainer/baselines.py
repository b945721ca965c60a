"""The paper's baselines in the same harness: SFT, Replay and DPO, on TRL's own trainers.

Each one trains a LoRA adapter with the same rank and target modules as the Q-Adapter it is compared
with, on the same training split, and leaves a plain PEFT adapter (the policy is the adapter model
itself: there is no composition with π1).

* ``sft``: supervised fine-tuning on the chosen answers (TRL ``SFTTrainer``, loss on the completion).
* ``replay``: SFT on the chosen answers plus the base model's own greedy answers to the same
  training prompts, the classic rehearsal defence against forgetting. A run by ``max_steps`` reads
  only max_steps × batch rows of that set: those rows are drawn first (seeded) and only their
  prompts are answered.
* ``dpo``: TRL ``DPOTrainer`` with β = 0.1 (``dpo_beta``) and the frozen base as reference.
* ``sft_kl``: policy regularization, the paper's third baseline family: SFT on the chosen answers
  plus ``kl_weight`` · KL(π ‖ π1) per completion token toward the frozen base (:class:`SFTWithKLTrainer`).

One function each (``train_sft``, ``train_replay``, ``train_dpo``, ``train_sft_kl``); the methods a job
can name, and their settings, are one registry, :data:`qadapter.recipes.methods.METHOD_REGISTRY`: a new
baseline is its trainer here plus one entry there.
"""

from __future__ import annotations

import dataclasses
import random

from datasets import Dataset
from transformers import TrainingArguments

from ..data import distinct_prompts
from ..backbone import check_target_modules, lora_config

def sft_dataset(pairs: Dataset) -> Dataset:
    """TRL prompt-completion rows from the chosen side of normalized pairs (a normalized response,
    one assistant message in a list or a string, is already a TRL completion)."""
    return Dataset.from_dict({"prompt": list(pairs["prompt"]), "completion": list(pairs["chosen"])})


def replay_dataset(pairs: Dataset, base_answers: list[str], prompts: list | None = None) -> Dataset:
    """SFT rows plus one row per prompt answered by the base model itself (``prompts``: the prompts
    ``base_answers`` answer, by default every pair's prompt in order)."""
    sft = sft_dataset(pairs)
    prompts = list(pairs["prompt"]) if prompts is None else list(prompts)
    if len(prompts) != len(base_answers):
        raise ValueError(f"replay: {len(base_answers)} base answers for {len(prompts)} prompts")
    first = pairs[0]["prompt"] if len(pairs) else prompts[0] if prompts else ""
    conversational = isinstance(first, list)
    replayed = [[{"role": "assistant", "content": a}] if conversational else a for a in base_answers]
    return Dataset.from_dict({"prompt": list(sft["prompt"]) + prompts,
                              "completion": list(sft["completion"]) + replayed})


def rows_seen(config, n_rows: int) -> int:
    """How many of ``n_rows`` training rows a run of ``config`` reads: all of them when it runs by
    epochs, at most max_steps × batch × accumulation × processes when ``max_steps`` is set."""
    if config.max_steps is None or config.max_steps <= 0:
        return n_rows
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size
    return min(n_rows, config.max_steps * per_step)


def draw_replay_rows(n_chosen: int, n_prompts: int, budget: int, seed: int) -> tuple[list[int], list[int]]:
    """Which rows of a replay set (``n_chosen`` SFT rows, then one row per distinct prompt) a run that
    reads ``budget`` rows uses: a seeded draw without replacement, the same mixture the trainer's own
    shuffle would give, so that only the drawn prompts need a base answer. Returns (chosen row
    indices, prompt indices), each sorted."""
    total = n_chosen + n_prompts
    drawn = range(total) if budget >= total else sorted(random.Random(seed).sample(range(total), budget))
    return [i for i in drawn if i < n_chosen], [i - n_chosen for i in drawn if i >= n_chosen]


def _sft_with_kl_trainer():
    """:class:`SFTWithKLTrainer`, defined on first use (TRL is imported lazily)."""
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class SFTWithKLTrainer(SFTTrainer):
        """SFT on the completions plus ``kl_weight`` · KL(π ‖ π1), both averaged over completion tokens;
        π1 = the same network with its LoRA adapter disabled (no gradient). Logs ``nll`` and ``kl``."""

        def __init__(self, *args, kl_weight: float = 0.1, **kwargs):
            super().__init__(*args, **kwargs)
            self.kl_weight = float(kl_weight)
            self.model_accepts_loss_kwargs = False  # a per-micro-batch mean, like QAdapterTrainer's loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            forward = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
            target = inputs["labels"][:, 1:]
            mask = target != -100
            count = mask.sum().clamp(min=1)
            log_p = F.log_softmax(model(**forward, use_cache=False).logits[:, :-1].float(), dim=-1)
            inner = model
            while hasattr(inner, "module"):
                inner = inner.module
            with torch.no_grad(), inner.disable_adapter():
                log_b = F.log_softmax(model(**forward, use_cache=False).logits[:, :-1].float(), dim=-1)
            nll = -(log_p.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1) * mask).sum() / count
            kl = ((log_p.exp() * (log_p - log_b)).sum(-1) * mask).sum() / count
            self._metrics[mode]["nll"].append(nll.item())
            self._metrics[mode]["kl"].append(kl.item())
            loss = nll + self.kl_weight * kl
            return (loss, None) if return_outputs else loss

    return SFTWithKLTrainer


def _training_kwargs(config) -> dict:
    """The TrainingArguments part of a QAdapterConfig, to build TRL's configs from."""
    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    values = {name: getattr(config, name) for name in names if hasattr(config, name)}
    # derived or process-specific values TrainingArguments recomputes itself
    for key in ("logging_dir",):
        values.pop(key, None)
    return values


def _trl_peft(model, config):
    peft_config = lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    check_target_modules(model, peft_config.target_modules)
    return peft_config


def _sft_on(trainer_class, model, tokenizer, data: Dataset, config, callbacks, **extra):
    from trl import SFTConfig

    args = SFTConfig(**_training_kwargs(config), max_length=config.max_length, completion_only_loss=True)
    trainer = trainer_class(model, args=args, train_dataset=data, processing_class=tokenizer,
                            peft_config=_trl_peft(model, config), callbacks=callbacks, **extra)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    return trainer


def train_sft(model, tokenizer, train_pairs: Dataset, config, *, callbacks=None, log=print):
    """SFT on the chosen answers; returns the trainer (``trainer.model`` is the PeftModel)."""
    from trl import SFTTrainer

    return _sft_on(SFTTrainer, model, tokenizer, sft_dataset(train_pairs), config, callbacks)


def train_sft_kl(model, tokenizer, train_pairs: Dataset, config, *, kl_weight: float = 0.1, callbacks=None, log=print):
    """SFT on the chosen answers plus ``kl_weight`` · KL(π ‖ π1) (:class:`SFTWithKLTrainer`)."""
    return _sft_on(_sft_with_kl_trainer(), model, tokenizer, sft_dataset(train_pairs), config, callbacks,
                   kl_weight=kl_weight)


def train_replay(model, tokenizer, train_pairs: Dataset, config, *, replay_new_tokens: int = 128, callbacks=None,
                 log=print):
    """SFT on the chosen answers plus the base model's own greedy answers to the training prompts."""
    from trl import SFTTrainer

    from ..generation import generate

    # one base answer per distinct prompt (DSP has 4 pairs per query), replayed once per prompt;
    # a run by steps reads only part of the set, so only the prompts of the rows it will read
    # are answered (generation would otherwise cost more than the training itself)
    unique = distinct_prompts(train_pairs["prompt"])
    budget = rows_seen(config, len(train_pairs) + len(unique))
    chosen_rows, prompt_rows = draw_replay_rows(len(train_pairs), len(unique), budget, config.seed)
    prompts = [unique[i] for i in prompt_rows]
    log(f"replay: {budget} training rows of {len(train_pairs) + len(unique)} ({len(train_pairs)} chosen "
        f"answers, {len(unique)} distinct prompts) are read; answering their {len(prompts)} prompts with "
        f"the base model (greedy, at most {replay_new_tokens} tokens)")
    answers = generate(model, tokenizer, prompts, alpha_0=0.0, alpha_tilde=1.0, policy="base",
                       max_new_tokens=replay_new_tokens) if prompts else []
    data = replay_dataset(train_pairs.select(chosen_rows), answers, prompts=prompts)
    return _sft_on(SFTTrainer, model, tokenizer, data, config, callbacks)


def train_dpo(model, tokenizer, train_pairs: Dataset, config, *, dpo_beta: float = 0.1, callbacks=None, log=print):
    """TRL's DPO with β = ``dpo_beta`` and the frozen base as reference; returns the trainer."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**_training_kwargs(config), beta=dpo_beta, max_length=config.max_length)
    trainer = DPOTrainer(model, args=args, train_dataset=train_pairs.select_columns(["prompt", "chosen", "rejected"]),
                         processing_class=tokenizer, peft_config=_trl_peft(model, config), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    return trainer
