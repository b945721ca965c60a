"""``qadapter compare``: train Q-Adapter and the paper's baselines on one dataset, then measure both
sides of the trade-off (retention and preference) for the base model and every method.

    qadapter compare --data pairs.jsonl --model M --methods qadapter,sft,replay,dpo --output-dir results/x \\
        [--preset default] [any qadapter train flag] [--eval-limit N] [--benchmarks mmlu0,arc_easy,kl] \\
        [--judge PATH_TO_REWARD_MODEL | --train-judge]

Flags this command does not know are ``qadapter train`` flags (``--learning_rate``, ``--max_steps``,
``--lora_r``, ``--seed``, ``--config FILE.yaml`` ...): they are parsed by ``qadapter train``'s own
parser and apply to every method alike.
"""

from __future__ import annotations

import argparse
import shlex
import sys

HELP = "train Q-Adapter and the SFT / Replay / DPO baselines on one dataset and compare retention and preference"


class _TrainFlagsParser(argparse.ArgumentParser):
    """Keeps the flags it does not know in ``args.train_flags`` (for ``qadapter train``'s parser)
    instead of failing on them."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.train_flags = list(getattr(namespace, "train_flags", None) or []) + list(extras)
        return namespace, []


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..compare import BENCHMARKS, DEFAULT_LIMITS, METHODS

    parser.__class__ = _TrainFlagsParser
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, metavar="DIR",
                        help="the comparison folder: one subfolder per method, eval/ (cached results), results.md, "
                             "results.csv, tradeoff.png. Rerunning reuses what is there.")
    parser.add_argument("--data", default=None, metavar="FILE", help="preference pairs (default: the embedded HH-RLHF harmless pairs)")
    parser.add_argument("--model", default=None, metavar="M", help="base model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--preset", default=None, help="qadapter train preset (default, long, paper)")
    parser.add_argument("--methods", type=_csv_list, default=list(METHODS), metavar="LIST",
                        help=f"comma-separated methods among {','.join(METHODS)} (default: all)")
    parser.add_argument("--benchmarks", type=_csv_list, default=list(BENCHMARKS), metavar="LIST",
                        help=f"retention evaluations among {','.join(BENCHMARKS)} (default: all; kl = KL from the base "
                             "model on general prompts). Held-out preference accuracy is always measured.")
    defaults = ",".join(f"{k}={'all' if v is None else v}" for k, v in DEFAULT_LIMITS.items())
    parser.add_argument("--eval-limit", default=None, metavar="N|NAME=N,...",
                        help=f"items per evaluation: N for every one, or NAME=N (all = every item); default {defaults} "
                             "(bbh: per task; preferences: held-out pairs; win_rate: held-out prompts; kl: general prompts)")
    judge = parser.add_mutually_exclusive_group()
    judge.add_argument("--judge", default=None, metavar="PATH",
                       help="reward model (a sequence-classification model folder or hub id) that judges the win rate "
                            "of each policy's answers against the base model's")
    judge.add_argument("--train-judge", action="store_true",
                       help="train that reward model here, from the base model on the training split (TRL RewardTrainer), "
                            "into DIR/judge")
    parser.add_argument("--judge-steps", type=int, default=100, help="--train-judge: training steps (default 100)")
    parser.add_argument("--judge-learning-rate", type=float, default=5e-5, help="--train-judge: learning rate (default 5e-5)")
    parser.add_argument("--judge-batch-size", type=int, default=8, help="--train-judge: pairs per step (default 8)")
    parser.add_argument("--bbh-tasks", type=_csv_list, default=None, metavar="LIST",
                        help="BBH tasks (default: boolean_expressions,date_understanding,"
                             "logical_deduction_three_objects,object_counting,web_of_lies)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="new tokens per generated answer: GSM8K, BBH, KL base answers, win-rate answers (default 128)")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="evaluation batch size (default 8)")
    parser.add_argument("--eval-seed", type=int, default=None, help="seed of subsamples and bootstrap (default: --seed)")
    parser.add_argument("--eval-data-dir", default=None, metavar="DIR",
                        help="benchmark files in the shipped layout (default: the copy shipped with qadapter)")
    parser.add_argument("--device", default=None, help="evaluation device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run, train_flags=[])
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("compare", help=HELP, allow_abbrev=False, description=HELP + ".",
                                   epilog="Any other flag is a `qadapter train` flag (see qadapter train --help), "
                                          "applied to every method alike.")
    return configure(parser)


def _canonical_command(args, train_argv: list[str]) -> str:
    words = ["qadapter", "compare", "--output-dir", str(args.output_dir), "--methods", ",".join(args.methods),
             "--benchmarks", ",".join(args.benchmarks)]
    if args.eval_limit:
        words += ["--eval-limit", args.eval_limit]
    if args.judge:
        words += ["--judge", args.judge]
    if args.train_judge:
        words += ["--train-judge", "--judge-steps", str(args.judge_steps), "--judge-learning-rate",
                  f"{args.judge_learning_rate:g}", "--judge-batch-size", str(args.judge_batch_size)]
    if args.bbh_tasks:
        words += ["--bbh-tasks", ",".join(args.bbh_tasks)]
    words += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.eval_seed is not None:
        words += ["--eval-seed", str(args.eval_seed)]
    if args.eval_data_dir:
        words += ["--eval-data-dir", args.eval_data_dir]
    return shlex.join(words + train_argv)


def run(args) -> int:
    from ..compare import run_comparison
    from .train import parse

    train_argv = []
    for flag in ("data", "model", "preset"):
        if getattr(args, flag) is not None:
            train_argv += [f"--{flag}", getattr(args, flag)]
    train_argv += list(args.train_flags)
    for flag in ("--method", "--output_dir", "--save_split"):
        if any(a == flag or a.startswith(flag + "=") for a in args.train_flags):
            print(f"qadapter compare: {flag} is set by compare itself (use --methods / --output-dir)", file=sys.stderr)
            return 2
    job, config = parse(train_argv)
    comparison = run_comparison(args.output_dir, job, config, methods=args.methods, benchmarks=args.benchmarks,
                                limits=args.eval_limit, judge=args.judge, train_judge=args.train_judge,
                                judge_steps=args.judge_steps, judge_learning_rate=args.judge_learning_rate,
                                judge_batch_size=args.judge_batch_size, bbh_tasks=args.bbh_tasks,
                                max_new_tokens=args.max_new_tokens, eval_batch_size=args.eval_batch_size,
                                eval_seed=args.eval_seed, data_dir=args.eval_data_dir, device=args.device,
                                train_argv=train_argv, command=_canonical_command(args, train_argv),
                                progress=args.progress)
    print(comparison.paths["md"].read_text(encoding="utf-8"), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="qadapter compare", description=HELP + ".", allow_abbrev=False))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
