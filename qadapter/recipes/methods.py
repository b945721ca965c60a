"""The methods a job can train: ONE registry, :data:`METHOD_REGISTRY`.

An entry says how to train the method (``train``: model, tokenizer, training pairs, config, job →
a ``transformers`` Trainer), how its trained policy is decoded and saved (``policy``), and which
settings a comparison's method spec (``dpo:beta=0.3``) may change (``params``). ``qadapter train
--method``, ``qadapter compare --methods`` and their validation all read it: a new baseline is its
trainer (e.g. in :mod:`qadapter.trainer.baselines`) plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class MethodParam:
    """A training setting a method spec may change: ``job.<field>`` or ``config.<field>``."""

    target: str  # "job" or "config"
    field: str
    type: type
    label: str
    zero_ok: bool = False  # 0 is a valid value (else a setting must be > 0)


@dataclass(frozen=True)
class Method:
    """One trainable method (see the module docstring)."""

    #: (model, tokenizer, train_pairs, config, job, callbacks, log) -> the trainer, trained
    train: Callable[..., Any]
    #: (trainer, tokenizer) -> (the policy as a QAdapter, save(folder))
    policy: Callable[..., tuple[Any, Callable]]
    #: the settings a method spec may set, by spec name
    params: dict[str, MethodParam] = field(default_factory=dict)


def _train_qadapter(model, tokenizer, pairs, config, job, callbacks, log):
    from ..trainer import QAdapterTrainer

    trainer = QAdapterTrainer(model, config, train_dataset=pairs, processing_class=tokenizer,
                              base_model_name_or_path=job.model, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    return trainer


def _qadapter_policy(trainer, tokenizer):
    qadapter = trainer.qadapter()
    return qadapter, qadapter.save_pretrained


def _baseline_policy(trainer, tokenizer):
    """A baseline's policy is its adapter model itself: a QAdapter with α0 = 0 and α̃ = 1 decodes and
    scores exactly that, through the same code as the Q-Adapter; saved as a plain PEFT adapter."""
    from ..io import save_atomically
    from ..modeling import QAdapter
    from ..settings import QAdapterSettings

    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    qadapter = QAdapter(peft_model, tokenizer, QAdapterSettings(alpha_0=0.0, alpha_tilde=1.0, parameterization="full"))

    def save(folder):
        return save_atomically(folder, lambda tmp: (peft_model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return qadapter, save


def _baseline(name: str, **job_settings: str):
    """A trainer of :mod:`qadapter.trainer.baselines` on the pairs' prompt/chosen/rejected columns;
    ``job_settings``: its keyword → the JobArguments field that sets it."""
    def train(model, tokenizer, pairs, config, job, callbacks, log):
        from ..trainer import baselines

        kwargs = {kw: getattr(job, f) for kw, f in job_settings.items()}
        return getattr(baselines, f"train_{name}")(model, tokenizer, pairs.select_columns(["prompt", "chosen", "rejected"]),
                                                   config, callbacks=callbacks, log=log, **kwargs)
    return train


_BUDGET = {"max_steps": MethodParam("config", "max_steps", int, "steps"),
           "learning_rate": MethodParam("config", "learning_rate", float, "lr")}

METHOD_REGISTRY: dict[str, Method] = {
    # beta=0 drops the χ² term: the residual objective is then DPO's loss with β = alpha_tilde, exactly
    "qadapter": Method(_train_qadapter, _qadapter_policy,
                       {**_BUDGET, "beta": MethodParam("config", "beta", float, "β (χ²)", zero_ok=True),
                        "alpha_tilde": MethodParam("config", "alpha_tilde", float, "α̃")}),
    "sft": Method(_baseline("sft"), _baseline_policy, dict(_BUDGET)),
    "replay": Method(_baseline("replay"), _baseline_policy, dict(_BUDGET)),
    "dpo": Method(_baseline("dpo", dpo_beta="dpo_beta"), _baseline_policy,
                  {**_BUDGET, "beta": MethodParam("job", "dpo_beta", float, "β")}),
    "sft_kl": Method(_baseline("sft_kl", kl_weight="kl_weight"), _baseline_policy,
                     {**_BUDGET, "kl_weight": MethodParam("job", "kl_weight", float, "KL weight")}),
}
