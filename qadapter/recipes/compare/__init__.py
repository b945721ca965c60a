"""Measure both sides of the trade-off, against the paper's baselines, in one call.

:func:`run_comparison` trains Q-Adapter and the paper's baselines (SFT, Replay, DPO) on one preference
dataset with the same base model, split, LoRA rank and target modules (each by
:func:`qadapter.recipes.train.run_training`, into ``OUT/<method>/``), then scores the base model and every
method through the same evaluators (:mod:`qadapter.evaluation`; a Q-Adapter through its composed
logits):

* retention: MMLU 0- / 5-shot, ARC-Easy / -Challenge, GSM8K-CoT 8-shot, BBH 3-shot CoT (each on a
  seeded subsample, ``limits``), and the KL divergence from the base model on general prompts;
* preference: held-out preference accuracy and implicit-reward margins on the held-out split the
  methods did not train on, and, given a judge (a reward model, or one trained here on the training
  split with TRL's ``RewardTrainer``), the win rate of each policy's answers against the base's.

It writes ``OUT/results.md``, ``OUT/results.csv`` (base + one row per method, every number with its
bootstrap 95% interval and n) and ``OUT/tradeoff.png`` (retention lost against preference gained).

**A frontier** instead of one point per method: methods are specs (``dpo:beta=0.3``,
``sft:max_steps=20``, ``sft_kl:kl_weight=1``; :data:`METHOD_REGISTRY` says which settings each
method takes), each trained once into its own folder, and ``strengths`` turns one trained Q-Adapter
into one policy per decode-time strength (``qadapter@0.5``, no retraining). Every evaluated policy
is a :class:`PolicyPoint`; ``OUT/frontier.png`` draws them all, retention (KL, ARC-Easy) against
preference (margin accuracy, preference accuracy, win rate), one curve per Q-Adapter and per
baseline method.
Everything is resumable: a method whose ``adapter/report.json`` exists is not retrained, a judge
already saved is not retrained, and an evaluation whose JSON under ``OUT/eval/<policy>/`` was made
with the same settings is not recomputed. ``qadapter compare`` is a thin shell over this package.

The package: :mod:`.methods` (method specs and policy points), :mod:`.evaluations` (the registry
of evaluations), :mod:`.limits` (``--eval-limit``), :mod:`.judge` (the win rate's judge),
:mod:`.cache` (fingerprints and cache keys), :mod:`.results` (the
:class:`Comparison` and how a number is read from it), :mod:`.report` (the trade-off statistics,
results.md / .csv, tradeoff.png), :mod:`.frontier` (frontier.png and its table), :mod:`.run`
(:func:`run_comparison`: plan, train, evaluate, report).
"""

from .evaluations import (BENCHMARKS, DEFAULT_BENCHMARKS, DEFAULT_LIMITS, EVALUATIONS, PREFERENCE_COLUMNS, REGISTRY,
                          RETENTION_BENCHMARKS, WIN_RATE_COLUMN, Column, Evaluation)
from .limits import parse_limits
from .methods import METHOD_REGISTRY, METHODS, MethodParam, MethodSpec, PolicyPoint, parse_method_spec, policy_points
from .report import tradeoff, write_results
from .results import Comparison
from .run import run_comparison
from ...trainer.reward_judge import train_reward_judge

__all__ = ["BENCHMARKS", "DEFAULT_BENCHMARKS", "DEFAULT_LIMITS", "EVALUATIONS", "METHODS", "METHOD_REGISTRY",
           "PREFERENCE_COLUMNS", "REGISTRY", "RETENTION_BENCHMARKS", "WIN_RATE_COLUMN", "Column", "Comparison",
           "Evaluation", "MethodParam", "MethodSpec", "PolicyPoint", "parse_limits", "parse_method_spec",
           "policy_points", "run_comparison", "tradeoff", "train_reward_judge", "write_results"]
