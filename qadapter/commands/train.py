"""``qadapter train``: train a Q-Adapter (the main job). Every ``QAdapterConfig`` field is a flag;
parsing, presets and checks live in :mod:`qadapter.recipes.config`, the job in :mod:`qadapter.recipes.train`."""

from __future__ import annotations

import sys

from ..recipes.config import HELP, build_train_parser, check_job, parse_train_args

__all__ = ["HELP", "build_parser", "main", "parse"]

build_parser = build_train_parser
parse = parse_train_args


def main(argv: list[str]) -> int:
    from ..recipes.train import format_report, run_training

    job, config = parse(argv)
    check_job(job, config)
    report = run_training(job, config)
    if "accuracy" in report:
        print(format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
