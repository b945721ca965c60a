"""``qadapter train``: train a Q-Adapter (the main job). Every ``QAdapterConfig`` field is a flag."""

from __future__ import annotations

import os
import sys

from ..errors import UserError

HELP = "train a Q-Adapter on preference pairs (no arguments: the embedded default job)"


def build_parser(prog: str = "qadapter train"):
    from transformers import HfArgumentParser

    from ..pipeline import JobArguments
    from ..trainer import QAdapterConfig

    parser = HfArgumentParser((JobArguments, QAdapterConfig), prog=prog, description=HELP + ". Flags override "
                              "--config FILE.yaml, which overrides --preset.")
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of flag values (keys = flag names)")
    for action in parser._actions:
        if action.dest == "resume_from_checkpoint":
            action.metavar = "auto|PATH"
            action.help = ("Resume training: 'auto' from the newest intact checkpoint in --output_dir (or from the "
                           "start when there is none), or from the checkpoint folder PATH. Checkpoints are checked "
                           "first (sizes and SHA-256 recorded when saved); a damaged or half-written one is named "
                           "and, under 'auto', skipped. Give the other flags as in the interrupted run.")
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
        try:
            with open(known.config, encoding="utf-8") as fh:
                file_values = yaml.safe_load(fh) or {}
        except OSError as e:
            raise UserError(f"--config {known.config}: {e.strerror or e}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"--config {known.config}: not valid YAML ({str(e).splitlines()[0]})") from None
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
    try:
        config = config_cls(**{k: values[k] for k in config_cls.__dataclass_fields__ if k in values and config_cls.__dataclass_fields__[k].init})
    except (ValueError, TypeError) as e:  # every error building the config from flags is a flag's
        raise UserError(str(e)) from e
    return job, config


def check_job(job, config) -> None:
    """Refuse, before anything is loaded, a method, model path, data path or checkpoint that cannot
    work; resolve ``--resume_from_checkpoint auto`` for the baselines (QAdapterTrainer does it itself)."""
    import os
    from pathlib import Path

    from ..embedded import DEFAULT_MODEL_ALIASES
    from ..integrity import check_no_remote_code
    from ..trainer.baselines import BASELINES

    if job.method not in ("qadapter", *BASELINES):
        raise UserError(f"--method {job.method}: unknown; choose qadapter, {', '.join(BASELINES)}")
    if job.data is not None and not Path(job.data).is_file():
        raise UserError(f"--data {job.data}: no such file")
    model = job.model
    if model not in DEFAULT_MODEL_ALIASES:
        path = Path(os.path.expanduser(model))
        looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model
        if path.exists() and not (path / "config.json").is_file():
            raise UserError(f"--model {model}: not a model folder (it holds no config.json)")
        if not path.exists() and looks_local:
            raise UserError(f"--model {model}: no such model folder")
        check_no_remote_code(path)
    for name, value in (("eval_pairs", job.eval_pairs), ("train_eval_pairs", job.train_eval_pairs)):
        if value is not None and value < 0:
            raise UserError(f"--{name} must be ≥ 0, got {value}")
    from ..integrity import resolve_resume, verify_checkpoint

    resume = config.resume_from_checkpoint
    if job.method != "qadapter":  # TRL's trainers take a path only
        config.resume_from_checkpoint = resolve_resume(resume, config.output_dir)
    elif resume and str(resume).lower() not in ("auto", "last", "latest", "true", "no", "none", "false"):
        if not os.path.exists(resume):
            raise UserError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
        verify_checkpoint(resume)  # before the model loads


def main(argv: list[str]) -> int:
    from ..pipeline import format_report, run_training

    job, config = parse(argv)
    check_job(job, config)
    report = run_training(job, config)
    if "accuracy" in report:
        print(format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
