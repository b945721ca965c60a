"""Configuration of :class:`~qadapter.trainer.QAdapterTrainer`: ``TrainingArguments`` plus the method's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..data.tokenization import check_lengths
from ..errors import check_number
from ..objective import NORMALIZERS, PARAMETERIZATIONS, VALUE_PAIRINGS


@dataclass
class QAdapterConfig(TrainingArguments):
    """``transformers.TrainingArguments`` with Q-Adapter's knobs (defaults: docs/results.md's sweep).

    Every ``Trainer`` argument works as usual (``output_dir``, ``per_device_train_batch_size``,
    ``gradient_accumulation_steps``, ``resume_from_checkpoint`` ...). Defaults that differ from
    ``TrainingArguments``: ``learning_rate=3e-4`` with linear decay and no warm-up,
    ``remove_unused_columns=False`` (the collator needs the tokenized columns).
    """

    # --- the objective (docs/method.md, eqs. 1-5)
    parameterization: str | None = field(default=None, metadata={
        "help": "How Q̂ is made from the adapter: 'residual' (default; Q̂ = α̃·(adapter logits − base logits), zero "
                "before training, so the customized policy starts at the base model) or 'full' (Q̂ = adapter logits, "
                "the authors' code; the default under --reference_compat). See docs/method.md.",
        "choices": list(PARAMETERIZATIONS)})
    alpha_tilde: float = field(default=1.0, metadata={"help": "α̃: temperature of the customized policy."})
    alpha_0: float | None = field(default=None, metadata={
        "help": "α0 = λ·α1: weight of log π1 (retention) in the customized policy. Default: tied to alpha_tilde "
                "(residual), the authors' 0.01 (full)."})
    gamma: float = field(default=1.0, metadata={"help": "γ: discount of the token-level MDP."})
    beta: float = field(default=0.1, metadata={"help": "β: weight of the χ² regularizer on the implied per-token rewards."})
    value_pairing: str = field(default="next_state", metadata={
        "help": "Which soft value the implied reward pairs with Q̂(s_t,a_t): 'next_state' V(s_t+1) (the math) or "
                "'same_state' V(s_t) (the authors' code). Same Bradley-Terry term; different χ² term.",
        "choices": list(VALUE_PAIRINGS)})
    normalizer: str = field(default="none", metadata={
        "help": f"length normalizer n of the Bradley-Terry term: one of {', '.join(NORMALIZERS)}.",
        "choices": list(NORMALIZERS)})
    reference_compat: bool = field(default=False, metadata={
        "help": "Reproduce the authors' objective exactly, quirks included (Q(s_t) paired with V(s_t), the "
                "response mask shifted by one, returns divided by the padded micro-batch length - 1). "
                "See docs/method.md."})
    # --- speed and memory (exact: the loss and its gradients do not change; see bench/NOTES.md)
    share_prompt: bool = field(default=True, metadata={
        "help": "Run each prompt once per pair instead of once per response: every pair once as [prompt | "
                "chosen | rejected], several pairs to a row, with a block attention mask, in both the adapter "
                "and the base pass. Falls back to one row per response for flash attention and models it "
                "does not support."})
    fused_head: bool = field(default=True, metadata={
        "help": "Compute Q-values and soft values in chunks from the hidden states, never holding the "
                "(positions x vocabulary) logits, and only at real (unpadded) response states. Falls back "
                "to the logits for heads it does not support (adapted or post-processed heads, ZeRO-3)."})
    # --- data
    max_length: int = field(default=512, metadata={"help": "Max tokens of prompt + response; the prompt is cut from the left."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Optional cap on prompt tokens (cut from the left)."})
    # --- the adapter (PEFT LoRA)
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={
        "help": "Comma-separated module names to adapt, or 'all-linear'."})
    # --- Trainer defaults that differ for this method
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate schedule."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the tokenized columns for the collator."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self):
        super().__post_init__()
        if self.parameterization is None:
            self.parameterization = "full" if self.reference_compat else "residual"
        if self.reference_compat and self.parameterization != "full":
            raise ValueError("reference_compat reproduces the authors' code, whose Q̂ is the adapter's logits: "
                             "use parameterization='full' with it")
        from ..settings import QAdapterSettings

        # the method's fields are validated (and alpha_0 resolved) by the one settings type
        self.alpha_0 = QAdapterSettings.from_config(self).alpha_0
        check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        check_lengths(self.max_length, self.max_prompt_length)
        check_number("lora_dropout", self.lora_dropout, low=0, high=1, high_open=True)
        for name in ("lora_r", "lora_alpha"):
            check_number(name, getattr(self, name), low=0, low_open=True)
