"""``qadapter train``: train a Q-Adapter (the main job). Every ``QAdapterConfig`` field is a flag."""

from __future__ import annotations

import sys

HELP = "train a Q-Adapter on preference pairs (no arguments: the embedded default job)"


def build_parser(prog: str = "qadapter train"):
    from transformers import HfArgumentParser

    from ..pipeline import JobArguments
    from ..trainer import QAdapterConfig

    parser = HfArgumentParser((JobArguments, QAdapterConfig), prog=prog, description=HELP + ". Flags override "
                              "--config FILE.yaml, which overrides --preset.")
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of flag values (keys = flag names)")
    return parser


def parse(argv: list[str]):
    """(JobArguments, QAdapterConfig) from presets < --config YAML < explicit flags."""
    import yaml

    from ..pipeline import PRESETS

    parser = build_parser()
    known, _ = parser.parse_known_args(argv)  # first pass: only to find --preset and --config
    defaults = {"output_dir": "runs/qadapter", "report_to": "none"}
    file_values = {}
    if known.config:
        with open(known.config, encoding="utf-8") as fh:
            file_values = yaml.safe_load(fh) or {}
        if not isinstance(file_values, dict):
            parser.error(f"{known.config}: expected a mapping of flag names to values")
    preset = file_values.get("preset", known.preset)
    if preset not in PRESETS:
        parser.error(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    defaults.update(PRESETS[preset])
    defaults.update(file_values)
    valid = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - valid)
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)} (in --config or a preset); see qadapter train --help")
    parser.set_defaults(**defaults)
    namespace = parser.parse_args(argv)
    job_cls, config_cls = parser.dataclass_types
    values = vars(namespace)
    job = job_cls(**{k: values[k] for k in job_cls.__dataclass_fields__})
    config = config_cls(**{k: values[k] for k in config_cls.__dataclass_fields__ if k in values and config_cls.__dataclass_fields__[k].init})
    return job, config


def main(argv: list[str]) -> int:
    from ..pipeline import format_report, run_training

    job, config = parse(argv)
    report = run_training(job, config)
    if "accuracy" in report:
        print(format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
