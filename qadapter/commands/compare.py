"""``qadapter compare``: train Q-Adapter and the paper's baselines on one dataset, then measure both
sides of the trade-off (retention and preference) for the base model and every method.

    qadapter compare --data pairs.jsonl --model M --methods qadapter,sft,replay,dpo --output-dir results/x \\
        [--preset default] [any qadapter train flag] [--eval-limit N] [--benchmarks mmlu0,arc_easy,kl] \\
        [--judge PATH_TO_REWARD_MODEL | --train-judge]
    # a frontier: one Q-Adapter at 5 decode-time strengths, DPO at 3 betas, two budgets, two KL weights
    qadapter compare ... --strengths 0.25,0.5,1,2,4 --methods qadapter dpo:beta=0.1 dpo:beta=0.3 dpo:beta=1 \
        sft:max_steps=20 sft:max_steps=80 replay:max_steps=20 replay:max_steps=80 sft_kl:kl_weight=0.1 sft_kl:kl_weight=1

Flags this command does not know are ``qadapter train`` flags (``--learning_rate``, ``--max_steps``,
``--lora_r``, ``--seed``, ``--config FILE.yaml`` ...): they are parsed by ``qadapter train``'s own
parser and apply to every method alike.
"""

from __future__ import annotations

import argparse
import shlex
import sys

HELP = ("train Q-Adapter and the SFT / Replay / DPO / SFT+KL baselines on one dataset and compare retention and "
        "preference: one point per method, or a frontier (Q-Adapter strengths, DPO betas, budgets)")


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def method_specs(words: list[str]) -> list[str]:
    """``--methods`` words, space- and/or comma-separated (``qadapter,sft dpo:beta=0.1``); a comma
    piece ``name=value`` without ``:`` continues the spec before it (``dpo:beta=0.1,max_steps=20``)."""
    specs: list[str] = []
    for word in words:
        for piece in _csv_list(word):
            if "=" in piece and ":" not in piece and specs and ":" in specs[-1]:
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


def _strengths(text: str) -> list[float]:
    try:
        return [float(t) for t in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--strengths takes numbers separated by commas, got {text!r}") from None


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..recipes.compare import BENCHMARKS, DEFAULT_BENCHMARKS, DEFAULT_LIMITS, METHOD_REGISTRY, METHODS

    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, metavar="DIR",
                        help="the comparison folder: one subfolder per method, eval/ (cached results), results.md, "
                             "results.csv, tradeoff.png. Rerunning reuses what is there.")
    parser.add_argument("--data", default=None, metavar="FILE", help="preference pairs (default: the embedded HH-RLHF harmless pairs)")
    parser.add_argument("--model", default=None, metavar="M", help="base model folder, hub id or embedded model (default: the embedded SmolLM2-135M-Instruct; also gemma3-270m)")
    parser.add_argument("--preset", default=None, help="qadapter train preset (default, long, paper)")
    settings = "; ".join(f"{m}: {', '.join(entry.params)}" for m, entry in METHOD_REGISTRY.items())
    parser.add_argument("--methods", nargs="+", default=[",".join(METHODS)], metavar="SPEC",
                        help=f"method specs, space- or comma-separated: a method among {','.join(METHOD_REGISTRY)}, "
                             "optionally with its own settings, e.g. dpo:beta=0.3 sft:max_steps=20 "
                             f"sft_kl:kl_weight=1 (settings: {settings}); each spec is trained once into its own "
                             f"folder (default: {','.join(METHODS)})")
    parser.add_argument("--strengths", type=_strengths, default=None, metavar="S1,S2,...",
                        help="decode-time strengths of the (residual) Q-Adapter, e.g. 0.25,0.5,1,2,4: one trained "
                             "adapter, one evaluated policy qadapter@S per strength (the frontier's Q-Adapter curve); "
                             "default: the trained policy only")
    parser.add_argument("--strengths-for", nargs="+", default=None, metavar="SPEC",
                        help="the Q-Adapter specs --strengths applies to (default: every qadapter spec); the others "
                             "are evaluated at their trained setting only, e.g. DPO through the residual objective, "
                             "qadapter:beta=0,alpha_tilde=0.3, as one point per β")
    parser.add_argument("--benchmarks", type=_csv_list, default=list(DEFAULT_BENCHMARKS), metavar="LIST",
                        help=f"retention evaluations among {','.join(BENCHMARKS)} (default: "
                             f"{','.join(DEFAULT_BENCHMARKS)}; kl = KL from the base model on general prompts; "
                             "ifeval and fluency generate long answers: name them). Held-out preference accuracy is "
                             "always measured.")
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
    # every flag compare does not know is a `qadapter train` flag: the CLI hands them over as train_flags
    parser.set_defaults(func=run, train_flags=[], takes_train_flags=True)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("compare", help=HELP, allow_abbrev=False, description=HELP + ".",
                                   epilog="Any other flag is a `qadapter train` flag (see qadapter train --help), "
                                          "applied to every method alike.")
    return configure(parser)


def _canonical_command(args, train_argv: list[str]) -> str:
    words = ["qadapter", "compare", "--output-dir", str(args.output_dir), "--methods", *method_specs(args.methods)]
    if args.strengths:
        words += ["--strengths", ",".join(f"{x:g}" for x in args.strengths)]
    if args.strengths_for:
        words += ["--strengths-for", *method_specs(args.strengths_for)]
    words += ["--benchmarks", ",".join(args.benchmarks)]
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
    from ..recipes.compare import run_comparison
    from ..recipes.config import parse_train_args as parse

    train_argv = []
    for flag in ("data", "model", "preset"):
        if getattr(args, flag) is not None:
            train_argv += [f"--{flag}", getattr(args, flag)]
    train_argv += list(args.train_flags)
    for flag in ("--method", "--output_dir", "--save_split"):
        if any(a == flag or a.startswith(flag + "=") for a in args.train_flags):
            print(f"qadapter compare: {flag} is set by compare itself (use --methods / --output-dir)", file=sys.stderr)
            return 2
    from ..recipes.compare import parse_method_spec

    try:
        methods = [parse_method_spec(m).name for m in method_specs(args.methods)]
    except ValueError as e:
        print(f"qadapter compare: --methods: {e}", file=sys.stderr)
        return 2
    job, config = parse(train_argv)
    comparison = run_comparison(args.output_dir, job, config, methods=methods, strengths=args.strengths,
                                strengths_for=method_specs(args.strengths_for) if args.strengths_for else None,
                                benchmarks=args.benchmarks,
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
    args, args.train_flags = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
