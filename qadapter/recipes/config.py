"""The settings of a job: :class:`JobArguments`, the presets (YAML files), and argv/YAML merging.

A job's settings are a :class:`JobArguments` (what to train on and what to measure) plus a
:class:`~qadapter.trainer.QAdapterConfig` (the training knobs, ``transformers.TrainingArguments``'s
fields among them). :func:`parse_train_args` builds both from, lowest first: the preset
(``presets/<name>.yaml`` beside this file, the single source of truth for each preset's values),
``--config FILE.yaml``, then the explicit flags. Every key of a preset or a YAML file is a
``qadapter train`` flag name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..embedded import DEFAULT_MODEL
from ..errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{what} {path}: expected a mapping of flag names to values")
    return values


def load_presets() -> dict[str, dict[str, Any]]:
    """Every preset by name: ``presets/<name>.yaml``."""
    return {p.stem: _read_yaml(p, "preset") for p in sorted(PRESET_DIR.glob("*.yaml"))}


#: Named settings for the whole job, read from ``presets/*.yaml``. ``default`` is the main job (a
#: fixed 60 steps on a 2-core CPU in under 10 minutes); ``long`` the documented longer run; ``paper``
#: the authors' settings. Flags given on the command line win.
PRESETS: dict[str, dict[str, Any]] = load_presets()
@dataclass
class JobArguments:
    """What to train on and what to measure; ``QAdapterConfig`` holds the training knobs."""

    method: str = field(default="qadapter", metadata={"help": "qadapter, or a baseline in the same harness: sft, replay, "
                                                             "dpo, sft_kl (SFT + a KL penalty toward the base)."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Local model folder, hub id or embedded model (default: the embedded SmolLM2-135M-Instruct; also gemma3-270m, docs/models.md)."})
    data: str | None = field(default=None, metadata={"help": "Preference pairs: a .json/.jsonl/.parquet file (default: the embedded HH-RLHF harmless pairs)."})
    on: str | None = field(default=None, metadata={"help": "Train on top of this earlier adapter or stack folder: its "
                           "customized policy (the base with its LoRAs merged in, frozen) is the new π1, and the result "
                           "is saved as a stack folder (docs/method.md, 'Stacking')."})
    preset: str = field(default="default", metadata={"help": f"Named settings: {', '.join(PRESETS)}. Explicit flags override them."})
    eval_pairs: float = field(default=100, metadata={"help": "Held-out pairs (an int) or fraction (< 1), split by prompt."})
    train_pairs: int | None = field(default=None, metadata={"help": "Use at most this many training pairs (seeded choice)."})
    train_eval_pairs: int = field(default=100, metadata={"help": "Training pairs on which accuracy is also measured."})
    label_noise: float = field(default=0.0, metadata={"help": "Noisy preferences: swap chosen and rejected on this fraction of "
                               "the training pairs (seeded by --seed; held-out pairs stay clean), e.g. 0.2."})
    drop_longer_than: int | None = field(default=None, metadata={"help": "Drop (and count) pairs whose prompt + longer response exceeds this many tokens, instead of truncating them."})
    max_train_minutes: float | None = field(default=None, metadata={"help": "Stop training after this many minutes (the adapter is still saved and measured)."})
    skip_invalid: bool = field(default=False, metadata={"help": "Skip invalid rows (counted and reported) instead of stopping at the first."})
    allow_empty_response: bool = field(default=False, metadata={"help": "Accept pairs whose chosen or rejected response is empty."})
    dpo_beta: float = field(default=0.1, metadata={"help": "β of the DPO baseline (the paper's 0.1)."})
    kl_weight: float = field(default=0.1, metadata={"help": "Weight of KL(π‖π1) per token in the sft_kl baseline."})
    show_examples: int = field(default=2, metadata={"help": "Held-out prompts answered by the base and the customized policy at the end."})
    repetition_prompts: int = field(default=0, metadata={"help": "Held-out prompts (distinct) answered greedily by the base "
                                    "and the customized policy to measure repeated word 4-grams per answer, with "
                                    "bootstrap intervals (0: none)."})
    example_new_tokens: int = field(default=48, metadata={"help": "New tokens per example answer (and per answer of "
                                    "--repetition_prompts)."})
    measure_held_out: bool = field(default=True, metadata={"help": "Measure the preference accuracy of the base and the "
                                   "trained policy on the held-out pairs after training (qadapter compare turns it off: "
                                   "it measures every method itself)."})
    save_split: bool = field(default=False, metadata={"help": "Also write the training and held-out pairs (normalized "
                             "prompt / chosen / rejected, source row) to OUTPUT_DIR/split/{train,held_out}.jsonl, "
                             "with the split counts in split.json, so every evaluation uses exactly this split."})


HELP = "train a Q-Adapter on preference pairs (no arguments: the embedded default job)"


def build_train_parser(prog: str = "qadapter train"):
    """The ``qadapter train`` parser: every :class:`JobArguments` and ``QAdapterConfig`` field is a flag."""
    from transformers import HfArgumentParser

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


def parse_train_args(argv: list[str]):
    """(JobArguments, QAdapterConfig) from the preset < --config YAML < explicit flags."""
    parser = build_train_parser()
    known, _ = parser.parse_known_args(argv)  # first pass: only to find --preset and --config
    import torch

    # pinned host memory only speeds up copies to a GPU; without one the DataLoader warns on every run
    defaults = {"output_dir": "runs/qadapter", "report_to": "none", "dataloader_pin_memory": torch.cuda.is_available()}
    file_values = _read_yaml(Path(known.config), "--config") if known.config else {}
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

    from ..embedded import check_available, embedded_model
    from ..integrity import check_no_remote_code
    from .methods import METHOD_REGISTRY

    if job.method not in METHOD_REGISTRY:
        raise UserError(f"--method {job.method}: unknown; choose {', '.join(METHOD_REGISTRY)}")
    if job.data is not None and not Path(job.data).is_file():
        raise UserError(f"--data {job.data}: no such file")
    model = job.model
    entry = embedded_model(model)
    if entry is not None:
        try:
            check_available(entry)
        except RuntimeError as e:
            raise UserError(f"--model {model}: {e}") from None
    else:
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
    if not 0.0 <= job.label_noise <= 1.0:
        raise UserError(f"--label_noise must be a fraction in [0, 1] of the training pairs, got {job.label_noise}")
    from ..integrity import resolve_resume, verify_checkpoint

    resume = config.resume_from_checkpoint
    if job.method != "qadapter":  # TRL's trainers take a path only
        config.resume_from_checkpoint = resolve_resume(resume, config.output_dir)
    elif resume and str(resume).lower() not in ("auto", "last", "latest", "true", "no", "none", "false"):
        if not os.path.exists(resume):
            raise UserError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
        verify_checkpoint(resume)  # before the model loads


