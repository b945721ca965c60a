"""Measure both sides of the trade-off: what a customized policy keeps (benchmarks, KL from the base
model) and what it gains (held-out preference accuracy, judged win rate against the base model).

Every evaluator takes any :class:`Policy` — a :class:`~qadapter.modeling.QAdapter`, or an
:class:`HFPolicy` around a plain / PEFT causal LM (SFT, DPO, the base model) — and scores it through
the same code. Each returns an :class:`EvalResult` (score, n, bootstrap 95% interval, per-item
samples). See docs/evaluation.md. The lm-evaluation-harness model lives in
:mod:`qadapter.evaluation.lm_eval_model` (imported on demand: it needs ``lm-eval``).
"""

from .benchmarks import (DATA_DIR, MCItem, bbh_tasks, load_arc, load_bbh, load_bbh_cot_prompt, load_general_prompts,
                         load_gsm8k, load_mmlu, mmlu_subjects)
from .divergence import kl_from_base, token_kl
from .judges import ConstantJudge, Judge, RewardModelJudge, judge_many
from ..chat import render_chat
from .policy import HFPolicy, Policy, QAdapterBaseView, base_policy, load_policy
from .preference import evaluate_preferences, split_pair, win_rate
from .scoring import continuation_logprobs, generate_texts
from .stats import EvalResult, Metric, bootstrap_ci, make_metric, subsample
from .tasks import (DEFAULT_BBH_TASKS, GSM8K_COT_EXEMPLARS, bbh_match, evaluate_arc, evaluate_bbh, evaluate_gsm8k,
                    evaluate_mmlu, extract_bbh_answer, extract_gsm8k_answer, gsm8k_target, multiple_choice_accuracy)

__all__ = [
    # policies
    "Policy", "HFPolicy", "QAdapterBaseView", "base_policy", "load_policy", "render_chat",
    # statistics and results
    "bootstrap_ci", "make_metric", "Metric", "EvalResult", "subsample",
    # primitives
    "continuation_logprobs", "generate_texts",
    # data
    "DATA_DIR", "MCItem", "load_mmlu", "mmlu_subjects", "load_arc", "load_gsm8k", "load_bbh", "load_bbh_cot_prompt",
    "bbh_tasks", "load_general_prompts",
    # retention
    "multiple_choice_accuracy", "evaluate_mmlu", "evaluate_arc", "evaluate_gsm8k", "evaluate_bbh",
    "extract_gsm8k_answer", "gsm8k_target", "extract_bbh_answer", "bbh_match", "GSM8K_COT_EXEMPLARS",
    "DEFAULT_BBH_TASKS", "kl_from_base", "token_kl",
    # preference
    "evaluate_preferences", "split_pair", "win_rate", "Judge", "ConstantJudge", "RewardModelJudge", "judge_many",
]
