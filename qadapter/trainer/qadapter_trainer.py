"""``QAdapterTrainer``: a thin ``transformers.Trainer`` subclass that optimizes the Q-Adapter loss.

Everything a ``Trainer`` does (resume, logging, evaluation, ``accelerate launch`` with DDP / FSDP /
DeepSpeed) is inherited; this file adds only the batch layout (:class:`PreferencePairCollator`),
the loss step (:func:`qadapter_step`), metric logging with TRL's names, and the adapter's config.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer

from ..modeling import CONFIG_NAME, QAdapterSettings, base_fingerprint, causal_lm_logits, lora_config
from ..objective import (implied_rewards, length_normalizers, preference_loss, reference_compat_loss,
                         soft_values, taken)
from .qadapter_config import QAdapterConfig


class PreferencePairCollator:
    """Pads tokenized pairs into one batch of 2B rows: the B chosen rows, then the B rejected rows.

    Prompts are left-padded to a common width P and responses right-padded after them, so every
    response starts at column P: the states that score response tokens are the columns P-1 .. T-2
    of every row, and the model can project to the vocabulary there only. Position ids are derived
    from the attention mask (see ``causal_lm_logits``), so padding changes nothing.

    Output: ``input_ids``, ``attention_mask``, ``response_mask`` (2B, T); ``seq_lengths`` (2B,)
    unpadded prompt + response lengths; ``prompt_width`` P (a 0-d tensor).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(f["prompt_input_ids"]) for f in features]
        responses = [list(f["chosen_input_ids"]) for f in features] + [list(f["rejected_input_ids"]) for f in features]
        prompts = prompts + prompts
        width_p = max(len(p) for p in prompts)
        width = width_p + max(len(r) for r in responses)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            start, end = width_p - len(p), width_p + len(r)
            input_ids[i, start:end] = torch.tensor(p + r, dtype=torch.long)
            attention_mask[i, start:end] = 1
            response_mask[i, width_p:end] = True
        seq_lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
                "seq_lengths": seq_lengths, "prompt_width": torch.tensor(width_p)}


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / DeepSpeed engines
        model = model.module
    return model


def qadapter_step(model, batch: dict[str, torch.Tensor], args: QAdapterConfig,
                  pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Loss and statistics of one batch laid out by :class:`PreferencePairCollator`.

    ``model`` is the (possibly DDP/FSDP-wrapped) PEFT model: one pass with the adapter gives Q̂,
    one pass without it (no gradient) gives log π1. Only the states that score response tokens
    are projected to the vocabulary.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    response_mask, seq_lengths = batch["response_mask"], batch["seq_lengths"]
    width_p, width = int(batch["prompt_width"]), input_ids.shape[1]
    if args.reference_compat:
        # The authors' alignment: the states *at* response tokens, each acting with the next token
        # (the padding token after a shorter response included), and nothing for the last token of
        # the longest sequence of the micro-batch, as their ``values[:, :-1]`` drops it.
        positions = torch.arange(width_p, width, device=input_ids.device)
        actions = F.pad(input_ids[:, width_p + 1:], (0, 1), value=pad_token_id)
        prompt_lengths = seq_lengths - response_mask.sum(-1)
        index_in_sequence = positions[None, :] - (width_p - prompt_lengths[:, None])
        mask = response_mask[:, width_p:] & (index_in_sequence < int(seq_lengths.max()) - 1)
    else:
        positions = torch.arange(width_p - 1, width - 1, device=input_ids.device)
        actions = input_ids[:, width_p:]
        mask = response_mask[:, width_p:]

    q = causal_lm_logits(model, input_ids, attention_mask, positions).float()  # (2B, L, V), with grad
    with torch.no_grad(), _unwrap(model).disable_adapter():
        log_pi1 = F.log_softmax(causal_lm_logits(model, input_ids, attention_mask, positions).float(), dim=-1)
    values = soft_values(q, log_pi1, args.alpha_0, args.alpha_tilde)  # (2B, L)
    q_taken = taken(q, actions)  # (2B, L)
    del q, log_pi1  # autograd keeps what backward needs; drop our references to the (2B, L, V) tensors

    half = input_ids.shape[0] // 2
    if args.reference_compat:
        out = reference_compat_loss(q_taken, values, mask, args.gamma, args.beta,
                                    padded_length=int(seq_lengths.max()))
    else:
        rewards = implied_rewards(q_taken, values, mask, args.gamma)
        n_c, n_r = length_normalizers(args.normalizer, mask[:half], mask[half:], seq_lengths[:half], seq_lengths[half:])
        out = preference_loss(rewards[:half], mask[:half], rewards[half:], mask[half:], n_c, n_r, args.beta)
    count = mask.sum().clamp(min=1)
    out["values_mean"] = (values.detach() * mask).sum() / count
    out["q_values_mean"] = (q_taken.detach() * mask).sum() / count
    return out


class QAdapterTrainer(Trainer):
    """Trains a LoRA adapter as a residual Q-function from preference pairs.

    Args:
        model: a causal LM (a model object, or a path / hub id), or a ``PeftModel`` that already
            holds the adapter to train. A bare model is wrapped with a LoRA adapter built from
            ``args.lora_*`` (or from ``peft_config`` when given).
        args: :class:`QAdapterConfig`.
        train_dataset / eval_dataset: preference pairs, either raw (any format
            :func:`qadapter.data.load_preference_pairs` reads, already loaded) or tokenized
            (``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``).
        processing_class: the tokenizer.

    Logged metrics (TRL's names where TRL has one): ``rewards/chosen``, ``rewards/rejected``
    (mean implied returns R(y|x)), ``rewards/margins``, ``rewards/accuracies``, ``pref_loss``,
    ``chi2_loss``, ``values/mean`` (mean V(s) over scored states), ``q_values/mean``.
    """

    def __init__(self, model, args: QAdapterConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, base_model_name_or_path: str | None = None, **kwargs):
        from peft import PeftModel, get_peft_model

        if isinstance(model, str):
            from transformers import AutoModelForCausalLM
            from ..embedded import resolve_model_path
            base_model_name_or_path = base_model_name_or_path or model
            model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32)
        if processing_class is None:
            raise ValueError("QAdapterTrainer needs processing_class=<the model's tokenizer>")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        fingerprint = base_fingerprint(model)
        if not isinstance(model, PeftModel):
            target = args.lora_target_modules
            model = get_peft_model(model, peft_config or lora_config(
                args.lora_r, args.lora_alpha, args.lora_dropout,
                target if target == "all-linear" else target.split(",")))
        self.settings = QAdapterSettings(
            alpha_tilde=args.alpha_tilde, alpha_0=args.alpha_0, gamma=args.gamma, beta=args.beta,
            normalizer=args.normalizer, reference_compat=args.reference_compat,
            base_model_name_or_path=base_model_name_or_path or getattr(model, "name_or_path", None)
            or model.get_base_model().name_or_path,
            base_fingerprint=fingerprint)
        train_dataset = self._tokenize(train_dataset, processing_class, args, "train")
        eval_dataset = self._tokenize(eval_dataset, processing_class, args, "eval")
        kwargs.setdefault("data_collator", PreferencePairCollator(processing_class.pad_token_id))
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        # Our loss is already a mean over the pairs of a micro-batch: let Trainer divide by the
        # gradient-accumulation steps as it does for any loss that ignores num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        self._stored_metrics = defaultdict(lambda: defaultdict(list))

    @staticmethod
    def _tokenize(dataset, tokenizer, args, split):
        if dataset is None or "prompt_input_ids" in dataset.column_names:
            return dataset
        from ..data import tokenize_pairs

        tokenized, report = tokenize_pairs(dataset, tokenizer, max_length=args.max_length,
                                           max_prompt_length=args.max_prompt_length)
        if args.should_log:
            print(f"qadapter: {split} data: {report.summary()}", flush=True)
        return tokenized

    # ------------------------------------------------------------------ loss and metrics
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = qadapter_step(model, inputs, self.args, pad_token_id=self.processing_class.pad_token_id)
        self._store(out, "train" if model.training else "eval")
        return (out["loss"], out) if return_outputs else out["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _store(self, out: dict[str, torch.Tensor], split: str) -> None:
        chosen, rejected = out["reward_chosen"].detach(), out["reward_rejected"].detach()
        metrics = {
            "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "pref_loss": out["pref_loss"].detach(), "chi2_loss": out["chi2_loss"].detach(),
            "values/mean": out["values_mean"], "q_values/mean": out["q_values_mean"],
        }
        gathered = self.accelerator.gather_for_metrics(torch.stack(list(metrics.values()))[None])
        for key, value in zip(metrics, gathered.float().mean(0).tolist()):
            self._stored_metrics[split][key].append(value)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._stored_metrics[split].items():
            logs[prefix + key] = sum(values) / len(values)
        self._stored_metrics[split].clear()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        import os
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            with open(os.path.join(output_dir, CONFIG_NAME), "w", encoding="utf-8") as fh:
                fh.write(self.settings.to_json())

    def qadapter(self):
        """The trained customized policy as a :class:`qadapter.QAdapter` (shares this trainer's model)."""
        from ..modeling import QAdapter

        return QAdapter(self.accelerator.unwrap_model(self.model), self.processing_class, self.settings)
