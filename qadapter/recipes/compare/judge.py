"""The judge of a comparison's win rate: trained here on the training split (or given), attached to
the evaluations with its cache key, and its own held-out accuracy (how far its verdicts can be
trusted). Steps of :func:`qadapter.recipes.compare.run.run_comparison`."""

from __future__ import annotations

from pathlib import Path
import numpy as np

from ...io import read_json, write_json
from .cache import folder_stamp
from .evaluations import Context
from .plan import Plan, Training


def train_judge_model(plan: Plan, training: Training, *, steps: int, learning_rate: float, batch_size: int,
                      log=print) -> str:
    """Train (or reuse) a reward model on the training split, into OUT/judge; return its folder."""
    from ...trainer.reward_judge import train_reward_judge

    judge_dir = plan.out / "judge"
    if (judge_dir / "judge_report.json").is_file():
        log(f"judge: trained already ({judge_dir}), reusing it")
        return str(judge_dir)
    train_reward_judge(plan.job.model, training.train_pairs, judge_dir, max_steps=steps, learning_rate=learning_rate,
                       batch_size=batch_size, max_length=plan.config.max_length, seed=plan.config.seed,
                       use_cpu=bool(getattr(plan.config, "use_cpu", False)) or plan.device == "cpu",
                       bf16=bool(getattr(plan.config, "bf16", False)), log=log)
    training.trained.append("judge")
    return str(judge_dir)


def attach_judge(plan: Plan, training: Training, ctx: Context, judge, *, trained_here: bool = False,
                 log=print) -> dict | None:
    """Give the evaluations the judge (loaded on first use) and its cache key; return what results.md
    says of it, with its own held-out accuracy (how far its verdicts can be trusted)."""
    from ...evaluation import RewardModelJudge

    if judge is None:
        log("no judge (give --judge PATH or --train-judge): the win rate is not measured")
        return None
    loaded = []

    def get_judge():
        if not loaded:
            loaded.append(RewardModelJudge(str(judge), device=plan.device, batch_size=plan.eval_batch_size)
                          if isinstance(judge, (str, Path)) else judge)
        return loaded[0]

    ctx.judge = get_judge
    if isinstance(judge, (str, Path)):
        ctx.judge_key = {"path": str(Path(judge).resolve()) if Path(judge).exists() else str(judge),
                         "stamp": folder_stamp(Path(judge)) if Path(judge).is_dir() else None}
        info = {"description": f"the reward model `{judge}` (sequence classification)"}
    else:
        ctx.judge_key = {"object": repr(judge)}
        info = {"description": f"`{judge!r}`"}
    if trained_here:
        rep = read_json(Path(judge) / "judge_report.json")
        info = {"description": f"a reward model trained here from the base model with TRL's RewardTrainer on "
                               f"the {rep['train_pairs']} training pairs ({rep['steps']} steps, "
                               f"batch {rep['batch_size']}, learning rate {rep['learning_rate']:g}), "
                               f"saved in `judge/`", "report": rep}
    accuracy = judge_accuracy(plan, training, ctx)
    if accuracy is not None:
        info["held_out_accuracy"] = accuracy
    return info


def judge_accuracy(plan: Plan, training: Training, ctx: Context) -> dict | None:
    """The judge's preference accuracy on the held-out pairs (cached in OUT/eval/judge/)."""
    from ...evaluation.preference import split_pair
    from ...evaluation.stats import make_metric, subsample, ties_half

    limit = plan.limits["preferences"]  # the held-out pairs the preference evaluation reads
    path = plan.out / "eval" / "judge" / "held_out_accuracy.json"
    key = {"judge": ctx.judge_key, "held_out": training.held_out_hash, "limit": limit, "seed": plan.eval_seed}
    cached = read_json(path) if path.is_file() else None
    if cached and cached.get("key") == key:
        return cached["result"]
    if not hasattr(ctx.judge(), "rewards"):
        return None
    rows = subsample(training.held_out, limit, plan.eval_seed)
    prompts, chosen, rejected = zip(*(split_pair(r) for r in rows))
    rewards = ctx.judge().rewards(list(prompts) * 2, list(chosen) + list(rejected))
    n = len(rows)
    m = make_metric(ties_half(np.asarray(rewards[:n]) - np.asarray(rewards[n:])), seed=plan.eval_seed)
    result = {"value": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high, "n": n}
    write_json(path, {"key": key, "result": result})
    return result
