"""Measure both sides of the trade-off, against the paper's baselines, in one call.

:func:`run_comparison` trains Q-Adapter and the paper's baselines (SFT, Replay, DPO) on one preference
dataset with the same base model, split, LoRA rank and target modules (each by
:func:`qadapter.pipeline.run_training`, into ``OUT/<method>/``), then scores the base model and every
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
with the same settings is not recomputed. ``qadapter compare`` is a thin shell over this module.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import enum
import gc
import hashlib
import json
import math
import shlex
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

__all__ = ["BENCHMARKS", "RETENTION_BENCHMARKS", "METHODS", "METHOD_REGISTRY", "DEFAULT_LIMITS", "Comparison",
           "MethodSpec", "PolicyPoint", "parse_method_spec", "policy_points", "run_comparison",
           "train_reward_judge", "parse_limits", "tradeoff", "write_results"]

#: the methods compared by default (the paper's Table: Q-Adapter and its SFT / Replay / DPO baselines)
METHODS = ("qadapter", "sft", "replay", "dpo")


# --------------------------------------------------------------------------- method specs and policy points
@dataclass(frozen=True)
class MethodParam:
    """A training setting a method spec may change: ``job.<field>`` or ``config.<field>``."""

    target: str  # "job" or "config"
    field: str
    type: type
    label: str


#: every method ``run_comparison`` trains, and the settings its spec (``method:name=value,...``) may
#: set. A new method or knob is one entry here; nothing else in this module names a method's settings.
_BUDGET = {"max_steps": MethodParam("config", "max_steps", int, "steps"),
           "learning_rate": MethodParam("config", "learning_rate", float, "lr")}
METHOD_REGISTRY: dict[str, dict[str, MethodParam]] = {
    "qadapter": {**_BUDGET, "beta": MethodParam("config", "beta", float, "β (χ²)")},
    "sft": dict(_BUDGET),
    "replay": dict(_BUDGET),
    "dpo": {**_BUDGET, "beta": MethodParam("job", "dpo_beta", float, "β")},
    "sft_kl": {**_BUDGET, "kl_weight": MethodParam("job", "kl_weight", float, "KL weight")},
}


def _number_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class MethodSpec:
    """One trained method: ``method`` with some training settings changed (``dpo:beta=0.3``).
    A plain name (``dpo``) trains with the comparison's settings, into ``OUT/dpo/`` as before."""

    method: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        if not self.params:
            return self.method
        return self.method + ":" + ",".join(f"{k}={_number_text(v)}" for k, v in self.params)

    @property
    def folder(self) -> str:
        """The folder name under OUT (and under OUT/eval) of this spec."""
        return self.method + "".join(f"_{k}={_number_text(v)}" for k, v in self.params)

    def setting_label(self) -> str:
        return ", ".join(f"{METHOD_REGISTRY[self.method][k].label}={_number_text(v)}" for k, v in self.params)

    def apply(self, job, config):
        """(job, config) of this spec: copies of the comparison's with the spec's settings."""
        job_changes = {METHOD_REGISTRY[self.method][k].field: v for k, v in self.params
                       if METHOD_REGISTRY[self.method][k].target == "job"}
        job = dataclasses.replace(job, method=self.method, **job_changes)
        config = copy.deepcopy(config)
        for k, v in self.params:
            param = METHOD_REGISTRY[self.method][k]
            if param.target == "config":
                setattr(config, param.field, v)
        return job, config


def parse_method_spec(text: "str | MethodSpec") -> MethodSpec:
    """``"dpo"``, ``"dpo:beta=0.3"``, ``"sft:max_steps=20,learning_rate=1e-4"`` → :class:`MethodSpec`.
    An unknown method or setting, or a value of the wrong type, is a ValueError naming the spec."""
    if isinstance(text, MethodSpec):
        return text
    spec = str(text).strip()
    method, _, rest = spec.partition(":")
    method = method.strip()
    if method not in METHOD_REGISTRY:
        raise ValueError(f"method spec {spec!r}: unknown method {method!r}; known: {', '.join(METHOD_REGISTRY)}")
    known = METHOD_REGISTRY[method]
    params: dict[str, Any] = {}
    for part in (p.strip() for p in rest.split(",") if p.strip()) if rest.strip() else ():
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise ValueError(f"method spec {spec!r}: {part!r} is not NAME=VALUE")
        if key not in known:
            raise ValueError(f"method spec {spec!r}: {method} has no setting {key!r}; it takes "
                             f"{', '.join(known)}")
        if key in params:
            raise ValueError(f"method spec {spec!r}: {key} given twice")
        try:
            number = known[key].type(value.strip())
        except ValueError:
            raise ValueError(f"method spec {spec!r}: {key}={value.strip()!r} is not a {known[key].type.__name__}") from None
        if not number > 0:
            raise ValueError(f"method spec {spec!r}: {key} must be > 0, got {value.strip()}")
        params[key] = number
    if rest.strip() == "" and ":" in spec:
        raise ValueError(f"method spec {spec!r}: nothing after ':' (give NAME=VALUE, or the plain method name)")
    return MethodSpec(method, tuple(sorted(params.items())))


@dataclass(frozen=True)
class PolicyPoint:
    """One evaluated policy, a point of the frontier: the base model, a trained spec, or a
    Q-Adapter spec decoded at ``strength`` (``qadapter@0.5``: one trained adapter, many points)."""

    spec: MethodSpec | None  # None: the base model
    strength: float | None = None

    @property
    def name(self) -> str:
        if self.spec is None:
            return "base"
        return self.spec.name + ("" if self.strength is None else f"@{_number_text(float(self.strength))}")

    @property
    def folder(self) -> str:
        if self.spec is None:
            return "base"
        return self.spec.folder + ("" if self.strength is None else f"@{_number_text(float(self.strength))}")

    @property
    def curve(self) -> str:
        """The curve this point is drawn on: a Q-Adapter's strengths join per trained adapter, a
        baseline's settings join per method."""
        if self.spec is None:
            return "base"
        return self.spec.name if self.strength is not None else self.spec.method

    def setting_label(self) -> str:
        if self.spec is None:
            return ""
        parts = [self.spec.setting_label()] if self.spec.params else []
        if self.strength is not None:
            parts.append(f"strength={_number_text(float(self.strength))}")
        return ", ".join(parts)


def policy_points(specs: Sequence[MethodSpec], strengths: Sequence[float] | None = None) -> list[PolicyPoint]:
    """The evaluated points (base first): every Q-Adapter spec at every decode-time strength
    (at its trained setting when ``strengths`` is None), every other spec once."""
    points = [PolicyPoint(None)]
    for spec in specs:
        if spec.method == "qadapter" and strengths:
            points += [PolicyPoint(spec, float(s)) for s in strengths]
        else:
            points.append(PolicyPoint(spec))
    return points


@dataclass(frozen=True)
class Column:
    """One reported number: ``metric`` of the evaluation ``evaluation``."""

    key: str
    evaluation: str
    metric: str
    label: str


#: the retention benchmarks, by the name ``--benchmarks`` takes (``kl`` is the KL from the base model)
BENCHMARKS: dict[str, Column] = {
    "mmlu0": Column("mmlu0", "mmlu0", "acc", "MMLU 0-shot"),
    "mmlu5": Column("mmlu5", "mmlu5", "acc", "MMLU 5-shot"),
    "arc_easy": Column("arc_easy", "arc_easy", "acc", "ARC-Easy"),
    "arc_challenge": Column("arc_challenge", "arc_challenge", "acc", "ARC-Challenge"),
    "gsm8k": Column("gsm8k", "gsm8k", "exact_match", "GSM8K-CoT 8-shot"),
    "bbh": Column("bbh", "bbh", "exact_match", "BBH 3-shot CoT"),
    "kl": Column("kl", "kl", "kl", "KL(π‖π1)"),
}
#: the benchmarks whose score drop is "retention lost" (higher is better for each)
RETENTION_BENCHMARKS = ("mmlu0", "mmlu5", "arc_easy", "arc_challenge", "gsm8k", "bbh")
PREFERENCE_COLUMNS = (
    Column("pref_acc", "preferences", "likelihood_accuracy", "pref. accuracy"),
    Column("margin_acc", "preferences", "margin_accuracy", "margin accuracy"),
    Column("margin", "preferences", "mean_margin", "margin"),
)
WIN_RATE_COLUMN = Column("win_rate", "win_rate", "win_rate", "win rate vs base")

#: default subsample sizes: small enough that a 135M model on a 2-core CPU scores one policy in a few
#: minutes (see docs/evaluation.md "Cost on a CPU"); None = every item. ``bbh`` is per task,
#: ``preferences`` counts held-out pairs, ``win_rate`` held-out prompts, ``kl`` general prompts.
DEFAULT_LIMITS: dict[str, int | None] = {"mmlu0": 50, "mmlu5": 10, "arc_easy": 50, "arc_challenge": 50, "gsm8k": 5,
                                         "bbh": 1, "kl": 20, "preferences": None, "win_rate": 20}
EVALUATIONS = tuple(BENCHMARKS) + ("preferences", "win_rate")

#: QAdapterConfig / JobArguments fields that change what a method learns: a resumed comparison must
#: use the same values (they are recorded in OUT/comparison.json)
TRAINING_CONFIG_FIELDS = ("seed", "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay",
                          "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                          "max_length", "max_prompt_length", "lora_r", "lora_alpha", "lora_dropout",
                          "lora_target_modules", "alpha_0", "alpha_tilde", "beta", "gamma", "normalizer",
                          "reference_compat", "parameterization", "value_pairing", "bf16", "fp16")
TRAINING_JOB_FIELDS = ("model", "data", "eval_pairs", "train_pairs", "drop_longer_than", "max_train_minutes",
                       "skip_invalid", "allow_empty_response", "dpo_beta", "kl_weight")


# --------------------------------------------------------------------------- small helpers
def parse_limits(spec: str | int | dict | None) -> dict[str, int | None]:
    """Subsample sizes per evaluation from ``"N"`` (every evaluation), ``"name=N,..."`` or both
    (``"30,mmlu5=5,preferences=all"``); ``all`` / ``none`` mean every item. Unnamed evaluations keep
    :data:`DEFAULT_LIMITS`."""
    limits = dict(DEFAULT_LIMITS)
    if spec is None:
        return limits
    if isinstance(spec, int):
        return {k: spec for k in limits}
    if isinstance(spec, dict):
        unknown = set(spec) - set(limits)
        if unknown:
            raise ValueError(f"unknown evaluation(s) {sorted(unknown)} in limits; known: {', '.join(limits)}")
        limits.update(spec)
        return limits

    def value(text: str) -> int | None:
        text = text.strip().lower()
        if text in ("all", "none", "full"):
            return None
        n = int(text)
        if n < 1:
            raise ValueError(f"a limit must be >= 1 (or 'all'), got {n}")
        return n

    named = {}
    for part in (p.strip() for p in str(spec).split(",") if p.strip()):
        if "=" in part:
            name, _, n = part.partition("=")
            name = name.strip()
            if name not in limits:
                raise ValueError(f"unknown evaluation {name!r} in --eval-limit; known: {', '.join(limits)}")
            named[name] = value(n)
        else:
            limits = {k: value(part) for k in limits}
    limits.update(named)
    return limits


def _jsonable(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, set):
        return sorted(_jsonable(v) for v in value)
    return value


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _adapter_fingerprint(folder: Path) -> str:
    """Content hash of an adapter folder's weights and configs (small files: a LoRA adapter)."""
    files = [p for p in folder.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in
             ("adapter_config.json", "qadapter_config.json"))]
    return _sha256_files(files)


def _folder_stamp(folder: Path) -> str:
    """Names, sizes and modification times of a (possibly large) model folder: cheap and changes on retraining."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _ties_half(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, 1.0, np.where(x < 0, 0.0, 0.5))


def _free_memory():
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


# --------------------------------------------------------------------------- results object
@dataclass
class Comparison:
    """What :func:`run_comparison` returns (and what :func:`write_results` reads).

    ``results[policy][evaluation]`` is an ``EvalResult.to_dict(samples=True)``; ``policies`` is
    ``["base", *methods]``; ``trained`` / ``computed`` list what this call trained and evaluated (the
    rest came from ``output_dir``); ``paths`` the files written.
    """

    output_dir: Path
    methods: list[str]
    benchmarks: list[str]
    results: dict[str, dict[str, dict]]
    info: dict[str, Any] = field(default_factory=dict)
    trained: list[str] = field(default_factory=list)
    computed: list[tuple[str, str]] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def policies(self) -> list[str]:
        return ["base"] + list(self.methods)


# --------------------------------------------------------------------------- the judge
def train_reward_judge(model: str, train_pairs: Sequence[dict], output_dir: str | Path, *, max_steps: int = 100,
                       learning_rate: float = 5e-5, batch_size: int = 8, max_length: int = 512, seed: int = 0,
                       use_cpu: bool = False, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train a reward model on preference pairs with TRL's ``RewardTrainer``: the base model ``model``
    with a one-logit classification head (``AutoModelForSequenceClassification``, every weight
    trained), ``max_steps`` steps of ``batch_size`` pairs. Saves it with its tokenizer and
    ``judge_report.json`` to ``output_dir`` (atomically) and returns the report."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from .embedded import resolve_model_path
    from .modeling import save_atomically

    output_dir = Path(output_dir)
    model_path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    rm = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_pairs]
    args = RewardConfig(output_dir=str(output_dir.with_name(output_dir.name + ".work")), max_steps=max_steps,
                        per_device_train_batch_size=batch_size, learning_rate=learning_rate, max_length=max_length,
                        seed=seed, report_to=[], save_strategy="no", logging_steps=max(1, max_steps // 10),
                        use_cpu=use_cpu, lr_scheduler_type="linear", warmup_steps=0)
    log(f"judge: training a reward model from {model} on {len(rows)} training pairs ({max_steps} steps of "
        f"{batch_size} pairs, learning rate {learning_rate:g}) with TRL's RewardTrainer")
    started = time.monotonic()
    trainer = RewardTrainer(rm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    report = {"base_model": model, "train_pairs": len(rows), "steps": trainer.state.global_step,
              "max_steps": max_steps, "batch_size": batch_size, "learning_rate": learning_rate,
              "max_length": max_length, "seed": seed, "train_seconds": round(time.monotonic() - started, 1),
              "trainer": "trl.RewardTrainer"}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        report["final_loss"] = losses[-1]

    def write(tmp):
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _write_json(Path(tmp) / "judge_report.json", report)

    save_atomically(output_dir, write)
    import shutil

    shutil.rmtree(args.output_dir, ignore_errors=True)
    return report


# --------------------------------------------------------------------------- statistics of the trade-off
def _item_scores(evaluation: str, result: dict) -> tuple[list, np.ndarray] | None:
    """(item keys, per-item primary scores) of a stored evaluation, or None without samples."""
    samples = result.get("samples")
    if not samples:
        return None
    if evaluation in ("mmlu0", "mmlu5", "arc_easy", "arc_challenge"):
        scores = [float(s["pred"] == s["gold"]) for s in samples]
    elif evaluation == "gsm8k":
        scores = [float(s["pred"] == s["target"]) for s in samples]
    elif evaluation == "bbh":
        scores = [float(s["exact_match"]) for s in samples]
    elif evaluation == "kl":
        scores = [float(s["kl"]) for s in samples]
    elif evaluation == "preferences":
        scores = list(_ties_half(np.asarray([s["logp_chosen"] - s["logp_rejected"] for s in samples])))
    elif evaluation == "win_rate":
        scores = [float(s["p"]) for s in samples]
    else:
        return None
    keys = [tuple(s.get(k) for k in ("subject", "task", "index")) for s in samples]
    if all(k == (None, None, None) for k in keys):
        keys = list(range(len(samples)))
    return keys, np.asarray(scores, dtype=np.float64)


def _bootstrap_means(x: np.ndarray, n_boot: int, rng) -> np.ndarray:
    out = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // max(1, x.size)))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        out[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    return out


def _mean_difference(pairs: list[tuple[dict, dict, str]], *, sign: float = 1.0, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, Any] | None:
    """Mean over evaluations of sign·(mean score of a − mean score of b), with a percentile bootstrap
    95% interval: items are resampled within each evaluation, paired (the per-item difference) when
    both sides scored the same items, independently otherwise."""
    rng = np.random.default_rng(seed)
    values, boots, n_items, paired_all = [], np.zeros(n_boot), 0, True
    for a, b, evaluation in pairs:
        sa, sb = _item_scores(evaluation, a), _item_scores(evaluation, b)
        if sa is None or sb is None or not len(sa[1]) or not len(sb[1]):
            return None
        if sa[0] == sb[0]:
            diff = sign * (sa[1] - sb[1])
            values.append(diff.mean())
            boots += _bootstrap_means(diff, n_boot, rng)
            n_items += diff.size
        else:
            paired_all = False
            values.append(sign * (sa[1].mean() - sb[1].mean()))
            boots += sign * (_bootstrap_means(sa[1], n_boot, rng) - _bootstrap_means(sb[1], n_boot, rng))
            n_items += min(sa[1].size, sb[1].size)
    if not values:
        return None
    boots /= len(values)
    low, high = np.quantile(boots, [0.025, 0.975])
    return {"value": float(np.mean(values)), "ci_low": float(low), "ci_high": float(high), "n": n_items,
            "n_evaluations": len(values), "paired": paired_all}


def _metric(results: dict, column: Column) -> dict[str, Any] | None:
    r = results.get(column.evaluation)
    if not r or column.metric not in r.get("metrics", {}):
        return None
    m = r["metrics"][column.metric]
    return {"value": m["value"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "n": r["n"]}


def tradeoff(results: dict[str, dict[str, dict]], methods: Sequence[str], benchmarks: Sequence[str], *,
             n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per method, both sides of the trade-off against the base model (each value with a bootstrap
    95% interval and n):

    * ``retention_lost``: mean over the retention benchmarks of (base score − method score),
      items paired; positive = knowledge lost;
    * ``kl``: KL(π‖π1) from the base model (its own interval);
    * ``preference_gained``: held-out preference accuracy (log π(y_w|x) > log π(y_l|x)) of the method
      minus the base model's, pairs paired;
    * ``win_rate``: the judged win rate against the base model's answers (0.5 = no change).
    """
    base = results.get("base", {})
    retention = [b for b in benchmarks if b in RETENTION_BENCHMARKS]
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        r = results.get(method, {})
        row: dict[str, Any] = {}
        triples = [(base[b], r[b], b) for b in retention if b in base and b in r]
        row["retention_lost"] = (_mean_difference(triples, n_boot=n_boot, seed=seed)
                                 if triples and len(triples) == len(retention) else None)
        row["kl"] = _metric(r, BENCHMARKS["kl"]) if "kl" in benchmarks else None
        row["preference_gained"] = (_mean_difference([(r["preferences"], base["preferences"], "preferences")],
                                                     n_boot=n_boot, seed=seed)
                                    if "preferences" in r and "preferences" in base else None)
        row["win_rate"] = _metric(r, WIN_RATE_COLUMN)
        out[method] = row
    return out


# --------------------------------------------------------------------------- several strengths, one forward
def _point_record(point: PolicyPoint) -> dict[str, Any]:
    return {"name": point.name, "folder": point.folder, "curve": point.curve,
            "method": point.spec.method if point.spec else "base", "spec": point.spec.name if point.spec else None,
            "params": dict(point.spec.params) if point.spec else {}, "strength": point.strength,
            "setting": point.setting_label()}


def _strength_name(strength: float) -> str:
    return f"strength={float(strength)!r}"  # qadapter.scoring.policy_specs' name of that policy


def _preferences_at_strengths(qa, pairs, strengths: Sequence[float], *, limit, seed: int, batch_size: int,
                              progress: bool, n_boot: int = 1000) -> dict[float, Any]:
    """:func:`~qadapter.evaluation.evaluate_preferences` of the Q-Adapter ``qa`` at every strength
    (against its own base view), from ONE scorer call: π1 and π̃ at each strength share every forward.
    The same items, requests and metrics as the evaluator (checked in tests/test_compare.py)."""
    from .evaluation.policy import pad_token_id
    from .evaluation.preference import encode_prompt_response, split_pair
    from .evaluation.stats import EvalResult, make_metric, subsample
    from .scoring import score

    rows = subsample(list(enumerate(pairs)), limit, seed)
    requests = []
    for _, row in rows:
        prompt, chosen, rejected = split_pair(row)
        requests.append(encode_prompt_response(qa.tokenizer, prompt, chosen))
        requests.append(encode_prompt_response(qa.tokenizer, prompt, rejected))
    scores = score(qa.model, requests, settings=qa.settings, policies=("base",), strengths=list(strengths),
                   pad_token_id=pad_token_id(qa.tokenizer), batch_size=batch_size, progress=progress,
                   desc="preferences at every strength")
    lb = np.asarray(scores.logprobs["base"]).reshape(-1, 2)
    out = {}
    for strength in strengths:
        lp = np.asarray(scores.logprobs[_strength_name(strength)]).reshape(-1, 2)
        margin = (lp[:, 0] - lb[:, 0]) - (lp[:, 1] - lb[:, 1])
        metrics = {"margin_accuracy": make_metric(_ties_half(margin), n_boot, seed),
                   "likelihood_accuracy": make_metric(_ties_half(lp[:, 0] - lp[:, 1]), n_boot, seed),
                   "mean_margin": make_metric(margin, n_boot, seed),
                   "base_likelihood_accuracy": make_metric(_ties_half(lb[:, 0] - lb[:, 1]), n_boot, seed)}
        samples = [{"index": i, "logp_chosen": float(a[0]), "logp_rejected": float(a[1]),
                    "base_logp_chosen": float(b[0]), "base_logp_rejected": float(b[1]), "margin": float(m)}
                   for (i, _), a, b, m in zip(rows, lp, lb, margin)]
        out[strength] = EvalResult("preferences", len(rows), metrics, "margin_accuracy", {"limit": limit, "seed": seed},
                                   samples=samples)
    return out


def _arc_at_strengths(qa, subset: str, strengths: Sequence[float], *, limit, seed: int, batch_size: int, data_dir,
                      progress: bool, n_boot: int = 1000) -> dict[float, Any]:
    """:func:`~qadapter.evaluation.evaluate_arc` of the Q-Adapter ``qa`` at every strength from ONE
    scorer call (each question's context computed once for all its choices and all strengths;
    checked in tests/test_compare.py against the evaluator at each strength)."""
    from .evaluation.benchmarks import load_arc
    from .evaluation.policy import pad_token_id
    from .evaluation.scoring import _prepare_requests
    from .evaluation.stats import subsample
    from .evaluation.tasks import _encode_pair, multiple_choice_result
    from .scoring import score

    items = subsample(load_arc(subset, data_dir), limit, seed)
    requests, owners = [], []
    for i, item in enumerate(items):
        for continuation in item.continuations:
            requests.append(_encode_pair(qa.tokenizer, item.context, continuation))
            owners.append(i)
    scores = score(qa.model, _prepare_requests(requests, None), settings=qa.settings, policies=(),
                   strengths=list(strengths), pad_token_id=pad_token_id(qa.tokenizer), batch_size=batch_size,
                   progress=progress, desc=f"arc_{subset} at every strength")
    return {strength: multiple_choice_result(items, owners, scores.logprobs[_strength_name(strength)],
                                             task=f"arc_{subset}", n_boot=n_boot, seed=seed,
                                             config={"subset": subset, "limit": limit, "seed": seed, "chat": False})
            for strength in strengths}


def _kl_at_strengths(qa, strengths: Sequence[float], *, prompts, responses, max_new_tokens: int, seed: int,
                     batch_size: int, progress: bool, n_boot: int = 1000) -> dict[float, Any]:
    """:func:`~qadapter.evaluation.kl_from_base` of the Q-Adapter ``qa`` at every strength from its
    own base branch, on the base model's fixed answers, from ONE scorer call (checked in
    tests/test_compare.py against the evaluator at each strength)."""
    from .evaluation.policy import encode, pad_token_id
    from .evaluation.stats import EvalResult, make_metric
    from .generation import encode_prompt
    from .scoring import score

    tok = qa.tokenizer
    messages = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    rows = []
    for i, (prompt, response) in enumerate(zip(messages, responses)):
        resp = encode(tok, response)
        if resp:
            rows.append((i, encode_prompt(tok, prompt), resp))
    kls = {}
    if rows:
        kls = score(qa.model, [(pr, r) for _, pr, r in rows], settings=qa.settings, policies=(),
                    strengths=list(strengths), kl="policy||base", pad_token_id=pad_token_id(tok),
                    batch_size=batch_size, progress=progress, desc="KL at every strength").kl
    out = {}
    n_tokens = sum(len(r[2]) for r in rows)
    for strength in strengths:
        sums = kls.get(_strength_name(strength), [])
        per_prompt = {i: v / len(resp) for (i, _, resp), v in zip(rows, sums)}
        order = sorted(per_prompt)
        values = [per_prompt[i] for i in order]
        result = EvalResult("kl_from_base", len(values), {"kl": make_metric(values, n_boot, seed)}, "kl",
                            {"direction": "policy||base", "limit": None, "seed": seed, "max_new_tokens": max_new_tokens,
                             "n_prompts": len(messages)},
                            samples=[{"index": i, "kl": per_prompt[i]} for i in order])
        result.extra.update(kl_token_mean=float(sum(sums)) / n_tokens if n_tokens else float("nan"), n_tokens=n_tokens,
                            skipped_empty=len(messages) - len(values), prompts=messages, responses=list(responses),
                            kl_max_prompt=float(np.max(values)) if values else float("nan"))
        out[strength] = result
    return out


# --------------------------------------------------------------------------- writers
def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if v == 0 or 0.01 <= abs(v) < 1000:
        return f"{v:.3f}"
    return f"{v:.2e}"


def _cell(m: dict | None, with_n: bool = False) -> str:
    if m is None:
        return "—"
    text = f"{_fmt(m['value'])} [{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"
    return text + (f" (n={m['n']})" if with_n else "")


def _columns(benchmarks: Sequence[str], judged: bool) -> list[Column]:
    cols = [BENCHMARKS[b] for b in BENCHMARKS if b in benchmarks]
    cols += list(PREFERENCE_COLUMNS)
    if judged:
        cols.append(WIN_RATE_COLUMN)
    return cols


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(comparison: Comparison) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` and ``tradeoff.png`` into ``comparison.output_dir``."""
    out = Path(comparison.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = comparison.info
    seed = info.get("eval_seed", 0)
    judged = any("win_rate" in comparison.results.get(p, {}) for p in comparison.policies)
    columns = _columns(comparison.benchmarks, judged)
    trade = tradeoff(comparison.results, comparison.methods, comparison.benchmarks, seed=seed)
    comparison.info["tradeoff"] = trade
    paths = {"md": out / "results.md", "csv": out / "results.csv", "png": out / "tradeoff.png"}
    points = {r["name"]: r for r in info.get("points") or []}
    specs = list(info.get("specs") or comparison.methods)  # the trained folders (a Q-Adapter's strengths share one)

    # ---- CSV: one row per policy, every number with its interval and n (win rate empty when not measured)
    csv_columns = _columns(comparison.benchmarks, True)
    header = ["policy", "method", "setting"]
    for c in csv_columns:
        header += [c.key, f"{c.key}_ci_low", f"{c.key}_ci_high", f"{c.key}_n"]
    for t in ("retention_lost", "preference_gained"):
        header += [t, f"{t}_ci_low", f"{t}_ci_high", f"{t}_n"]
    tmp = paths["csv"].with_name("results.csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for policy in comparison.policies:
            record = points.get(policy) or {}
            cells = [policy, record.get("method", policy if policy == "base" else policy.split(":")[0].split("@")[0]),
                     record.get("setting", "")]
            metrics = [_metric(comparison.results.get(policy, {}), c) for c in csv_columns]
            if policy == "base":
                zero = {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": ""}
                metrics += [zero, zero]
            else:
                metrics += [trade[policy]["retention_lost"], trade[policy]["preference_gained"]]
            for m in metrics:
                cells += ["", "", "", ""] if m is None else [m["value"], m["ci_low"], m["ci_high"], m["n"]]
            writer.writerow(cells)
    tmp.replace(paths["csv"])

    # ---- the plot
    _plot(paths["png"], trade, comparison)
    frontier = _plot_frontier(out / "frontier.png", comparison, columns)
    if frontier:
        paths["frontier"] = frontier
    from .plots import plot_training_curves

    histories = {m: ((info.get("reports") or {}).get(m) or {}).get("log_history") for m in specs}
    curves = plot_training_curves({m: h for m, h in histories.items() if h}, out / "training_curves.png",
                                  title="Training curves of the compared methods")
    if curves:
        paths["curves"] = curves

    # ---- markdown
    md = ["# Q-Adapter against the paper's baselines", ""]
    md.append(f"Base model `{info.get('model')}`, preference data `{info.get('data')}`; "
              f"methods: {', '.join(specs)}"
              + (f"; every Q-Adapter decoded at strengths {', '.join(f'{x:g}' for x in info['strengths'])} "
                 "(one trained adapter, one policy per strength)" if info.get("strengths") else "") + ".")
    md.append("")
    split = info.get("split") or {}
    if split:
        md.append(f"- **Split** (by prompt, seed {split.get('seed')}): {split.get('n_train_pairs')} training pairs "
                  f"({split.get('n_train_prompts')} prompts; {split.get('n_train_pairs_used', split.get('n_train_pairs'))} "
                  f"used for training), {split.get('n_eval_pairs')} held-out pairs ({split.get('n_eval_prompts')} "
                  f"prompts). Every method trained on exactly this split (identical split files, checked); every "
                  f"held-out number below is on its held-out pairs.")
    md.append(f"- **Seeds**: training and split seed {info.get('train_seed')}; evaluation seed {seed} "
              "(benchmark subsamples and bootstrap intervals).")
    if info.get("lora"):
        md.append(f"- **Adapter** (every method): {info['lora']}.")
    md.append("")

    # main table
    n_header = {}
    for c in columns:
        ns = {(_metric(comparison.results.get(p, {}), c) or {}).get("n") for p in comparison.policies} - {None}
        n_header[c.key] = ns.pop() if len(ns) == 1 else None
    head = ["policy"] + [c.label + (f" (n={n_header[c.key]})" if n_header[c.key] is not None else "") for c in columns]
    rows = [[f"**{p}**" if p == "base" else p] +
            [_cell(_metric(comparison.results.get(p, {}), c), with_n=n_header[c.key] is None) for c in columns]
            for p in comparison.policies]
    md += ["## Results", "", "Each cell: value [bootstrap 95% interval]; n = items scored.", "", _table(head, rows), ""]
    if not judged:
        md += ["Win rate: **not measured** (no judge: pass `--judge PATH_TO_REWARD_MODEL` or `--train-judge`).", ""]

    # trade-off table
    head = ["method", "retention lost", "KL(π‖π1)", "preference gained", "win rate vs base"]
    rows = [[m, _cell(trade[m]["retention_lost"], True), _cell(trade[m]["kl"], True),
             _cell(trade[m]["preference_gained"], True),
             _cell(trade[m]["win_rate"], True) if judged else "not measured"] for m in comparison.methods]
    retention = [BENCHMARKS[b].label for b in comparison.benchmarks if b in RETENTION_BENCHMARKS]
    if "frontier" in paths:
        md += _frontier_section(comparison, columns)
    md += ["## Trade-off against the base model", "",
           f"Retention lost: mean over {', '.join(retention) if retention else '(no retention benchmark)'} of "
           "(base score − method score), items paired. Preference gained: held-out preference accuracy "
           "of the method − the base model's, pairs paired. Lower-right of the plot is worse, upper-left better.",
           "", _table(head, rows), "", "![trade-off](tradeoff.png)", ""]

    # how it was made
    md += ["## How these numbers were made", ""]
    if info.get("commands"):
        md += ["Commands run in this folder, the last one made these tables (a rerun reuses every trained method "
               "and every evaluation cached with the same settings):", ""]
        md += [f"    {command}" for command in info["commands"]] + [""]
    else:
        md += ["Made with the Python API (`qadapter.compare.run_comparison`).", ""]
    train_rows = []
    for m in specs:
        rep = (info.get("reports") or {}).get(m) or {}
        train_rows.append([m, str(rep.get("steps", "?")), str(rep.get("train_pairs", "?")),
                           str(rep.get("train_seconds", "?")), str(rep.get("stopped_by_time_limit_at_step") or "no")])
    md += ["Training: each method is one run of `qadapter train` (same base model, split, seed, LoRA settings):", "",
           _table(["method", "steps", "training pairs", "seconds", "stopped by the time limit at step"], train_rows), ""]
    if "curves" in paths:
        md += ["Training curves (what each trainer logged; the Q-Adapter and DPO log TRL's `rewards/*` on their "
               "training batches):", "", "![training curves](training_curves.png)", ""]
    if info.get("train_commands"):
        md += ["Equivalent `qadapter train` commands:", ""]
        md += [f"    {info['train_commands'][m]}" for m in specs if m in info["train_commands"]] + [""]
    if info.get("training_settings"):
        md += ["Training settings (every method): " + ", ".join(
            f"`{k.removeprefix('job.')}={v}`" for k, v in info["training_settings"].items()) + ".", ""]
    judge = info.get("judge")
    if judge:
        line = f"**Judge**: {judge.get('description')}"
        acc = judge.get("held_out_accuracy")
        if acc:
            line += (f"; its accuracy on the held-out pairs (reward of chosen > rejected): "
                     f"{_cell(acc, True)}")
        md += [line + ". Win rate = mean over held-out prompts of the judge's verdict on the policy's greedy "
               "answer against the base model's (1 win, 0.5 tie, 0 loss).", ""]
    limits = info.get("limits") or {}
    if limits:
        md.append("**Subsamples** (seeded, the same items for every policy): " + ", ".join(
            f"{k} {'all' if v is None else v}" for k, v in limits.items()
            if k in comparison.benchmarks or k in ("preferences", "win_rate")) +
            (f"; BBH tasks {', '.join(info['bbh_tasks'])} ({limits.get('bbh')} per task)" if "bbh" in comparison.benchmarks
             and info.get("bbh_tasks") else "") +
            f"; at most {info.get('max_new_tokens')} new tokens per generated answer (greedy).")
        md.append("")
    md += ["Definitions (docs/evaluation.md): retention benchmarks score raw text as lm-evaluation-harness does "
           "(accuracy / exact match); KL(π‖π1) is nats per token on the base model's greedy answers to general "
           "prompts (UltraFeedback), averaged over prompts; pref. accuracy: log π(y_w|x) > log π(y_l|x); "
           "margin: [log π(y_w|x) − log π1(y_w|x)] − [log π(y_l|x) − log π1(y_l|x)], margin accuracy: margin > 0 "
           "(the base model gets 0.5 and 0 by definition). Every policy, the base included, is scored by the "
           "same code; a Q-Adapter through its composed logits (eq. 1). Per-item results: `eval/<policy>/*.json`.",
           ""]
    tmp = paths["md"].with_name("results.md.tmp")
    tmp.write_text("\n".join(md), encoding="utf-8")
    tmp.replace(paths["md"])
    return paths


def _plot(path: Path, trade: dict[str, dict], comparison: Comparison) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = comparison.methods
    panels = []
    if any(trade[m]["retention_lost"] for m in methods):
        names = ", ".join(BENCHMARKS[b].label for b in comparison.benchmarks if b in RETENTION_BENCHMARKS)
        panels.append(("retention_lost", "retention lost: mean score drop vs base\n" + "\n".join(
            textwrap.wrap(f"({names})", 60))))
    if any(trade[m]["kl"] for m in methods):
        panels.append(("kl", "KL(π‖π1) from the base model (nats/token)"))
    if not panels:
        panels.append((None, "method"))
    fig = Figure(figsize=(5.6 * len(panels), 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (xkey, xlabel) in zip(axes, panels):
        points = []
        for i, m in enumerate(methods):
            y = trade[m]["preference_gained"]
            x = trade[m][xkey] if xkey else {"value": float(i), "ci_low": float(i), "ci_high": float(i)}
            if x and y:
                points.append((i, m, x, y))
        xs = [0.0] + [x["value"] for *_, x, _ in points]
        ys = [0.0] + [y["value"] for *_, y in points]
        x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
        placed: list[tuple[float, float]] = [(0.0, 0.0)]
        for i, m, x, y in points:
            # stack the labels of (nearly) coinciding points instead of printing them over each other
            near = sum(abs(x["value"] - px) < 0.1 * x_span and abs(y["value"] - py) < 0.05 * y_span for px, py in placed)
            placed.append((x["value"], y["value"]))
            xerr = [[max(0.0, x["value"] - x["ci_low"])], [max(0.0, x["ci_high"] - x["value"])]]
            yerr = [[max(0.0, y["value"] - y["ci_low"])], [max(0.0, y["ci_high"] - y["value"])]]
            ax.errorbar([x["value"]], [y["value"]], xerr=xerr, yerr=yerr, fmt="o", color=f"C{i}", capsize=4,
                        markersize=7, label=m)
            ax.annotate(m, (x["value"], y["value"]), textcoords="offset points", xytext=(7, 7 + 12 * near),
                        fontsize=10, color=f"C{i}")
        ax.scatter([0.0], [0.0], marker="*", s=140, color="black", zorder=5, label="base")
        ax.annotate("base", (0.0, 0.0), textcoords="offset points", xytext=(7, -13), fontsize=9)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_xlabel(xlabel)
        if not xkey:
            ax.set_xticks([])
        ax.set_ylabel("preference gained: held-out pref. accuracy − base")
        ax.grid(alpha=0.3)
    fig.suptitle("Both sides of the trade-off (upper-left is better; bars: bootstrap 95% intervals)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


#: the frontier's axes: retention (x) and preference (y), each drawn where it was measured
FRONTIER_X = ("kl", "arc_easy")
FRONTIER_Y = ("margin_acc", "pref_acc", "win_rate")


def _frontier_points(comparison: Comparison) -> list[dict[str, Any]]:
    """Point records (name, curve, setting), base first; hand-made comparisons without
    ``info["points"]``: each method its own curve."""
    records = list(comparison.info.get("points") or [])
    if not records:
        records = [{"name": p, "curve": p, "setting": "", "method": p} for p in comparison.policies]
    return records


def _frontier_axes(comparison: Comparison, columns: Sequence[Column]):
    by_key = {c.key: c for c in columns}
    measured = lambda c: any(_metric(comparison.results.get(p, {}), c) for p in comparison.policies)  # noqa: E731
    xs = [BENCHMARKS[k] for k in FRONTIER_X if k in comparison.benchmarks and measured(BENCHMARKS[k])]
    ys = [by_key[k] for k in FRONTIER_Y if k in by_key and measured(by_key[k])]
    return xs, ys


def _frontier_section(comparison: Comparison, columns: Sequence[Column]) -> list[str]:
    xs, ys = _frontier_axes(comparison, columns)
    head = ["point", "method", "setting"] + [c.label for c in xs + ys]
    rows = []
    for r in _frontier_points(comparison):
        res = comparison.results.get(r["name"], {})
        rows.append([f"**{r['name']}**" if r["name"] == "base" else r["name"], r.get("method", ""),
                     r.get("setting") or "—"] + [_cell(_metric(res, c), with_n=True) for c in xs + ys])
    strengths = comparison.info.get("strengths")
    return ["## Frontier", "",
            "Every evaluated policy is a point: retention on x (KL(π‖π1) from the base on general prompts, lower "
            "is closer to the base; ARC-Easy accuracy), preference on y (held-out margin accuracy and preference "
            "accuracy" + (", the judged win rate against the base" if any(c.key == "win_rate" for c in ys) else "")
            + "). " + (f"A Q-Adapter is ONE trained adapter decoded at strengths {', '.join(f'{x:g}' for x in strengths)} "
                       "(π̃ ∝ π1·exp(s·(zθ − z1)); s = 1 is the trained policy), joined as one curve; " if strengths else "")
            + "each baseline's trained settings (DPO's β, the training budgets, sft_kl's weight) are joined as one "
              "curve per method; the base is the black star. Each cell: value [bootstrap 95% interval] (n = items).",
            "", _table(head, rows), "", "![frontier](frontier.png)", ""]


def _plot_frontier(path: Path, comparison: Comparison, columns: Sequence[Column]) -> Path | None:
    """``frontier.png``: one panel per (retention x, preference y) pair; every curve of
    :func:`_frontier_points`, each point with both intervals, the base as a star. None when no
    retention axis (KL, ARC-Easy) was measured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs, ys = _frontier_axes(comparison, columns)
    if not xs or not ys:
        return None
    records = _frontier_points(comparison)
    curves: dict[str, list[dict]] = {}
    for r in records:
        if r["name"] != "base":
            curves.setdefault(r["curve"], []).append(r)
    fig = Figure(figsize=(5.4 * len(xs), 4.3 * len(ys)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(ys), len(xs), squeeze=False)
    for row, ycol in enumerate(ys):
        for col, xcol in enumerate(xs):
            ax = axes[row][col]
            for i, (curve, members) in enumerate(curves.items()):
                pts = []
                for r in members:
                    res = comparison.results.get(r["name"], {})
                    x, y = _metric(res, xcol), _metric(res, ycol)
                    if x and y:
                        pts.append((r, x, y))
                if not pts:
                    continue
                color = f"C{i % 10}"
                ax.plot([x["value"] for _, x, _ in pts], [y["value"] for *_, y in pts], "-", color=color, lw=1.2,
                        alpha=0.8, marker="o" if curve.startswith("qadapter") else "s", markersize=5,
                        label=curve + (f" ({len(pts)} points)" if len(pts) > 1 else ""))
                for r, x, y in pts:
                    ax.errorbar([x["value"]], [y["value"]],
                                xerr=[[max(0.0, x["value"] - x["ci_low"])], [max(0.0, x["ci_high"] - x["value"])]],
                                yerr=[[max(0.0, y["value"] - y["ci_low"])], [max(0.0, y["ci_high"] - y["value"])]],
                                fmt="none", ecolor=color, alpha=0.35, capsize=2, lw=0.8)
                    short = (r.get("setting") or "").replace("strength=", "s=")
                    if short:
                        ax.annotate(short, (x["value"], y["value"]), textcoords="offset points", xytext=(4, 4),
                                    fontsize=7, color=color)
            bx, by = _metric(comparison.results.get("base", {}), xcol), _metric(comparison.results.get("base", {}), ycol)
            if bx and by:
                ax.errorbar([bx["value"]], [by["value"]],
                            xerr=[[max(0.0, bx["value"] - bx["ci_low"])], [max(0.0, bx["ci_high"] - bx["value"])]],
                            yerr=[[max(0.0, by["value"] - by["ci_low"])], [max(0.0, by["ci_high"] - by["value"])]],
                            fmt="*", color="black", markersize=12, capsize=3, zorder=5, label="base")
            n_x = {(_metric(comparison.results.get(p, {}), xcol) or {}).get("n") for p in comparison.policies} - {None}
            n_y = {(_metric(comparison.results.get(p, {}), ycol) or {}).get("n") for p in comparison.policies} - {None}
            ax.set_xlabel(("KL(π‖π1) from the base, nats/token (← closer to the base)" if xcol.key == "kl"
                           else f"{xcol.label} accuracy (→ more retained)")
                          + (f", n={n_x.pop()}" if len(n_x) == 1 else ""))
            ax.set_ylabel(f"held-out {ycol.label}" + (f", n={n_y.pop()}" if len(n_y) == 1 else ""))
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle("Frontier: preference (y) against retention (x); bars: bootstrap 95% intervals", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- the comparison
def _training_fingerprint(job, config) -> dict[str, Any]:
    fp = {f"job.{k}": _jsonable(getattr(job, k, None)) for k in TRAINING_JOB_FIELDS}
    fp.update({k: _jsonable(getattr(config, k, None)) for k in TRAINING_CONFIG_FIELDS})
    return fp


def _train_command(train_argv: Sequence[str], spec: "MethodSpec | str", folder: Path) -> str:
    """The ``qadapter train`` command line that trains ``spec`` exactly as the comparison did."""
    spec = parse_method_spec(spec)
    own = []
    for k, v in spec.params:
        own += [f"--{METHOD_REGISTRY[spec.method][k].field}", _number_text(v)]
    return shlex.join(["qadapter", "train", *train_argv, "--method", spec.method, *own, "--output_dir", str(folder),
                       "--save_split", "true"])


def _method_done(folder: Path) -> bool:
    return ((folder / "adapter" / "report.json").is_file() and (folder / "split" / "train.jsonl").is_file()
            and (folder / "split" / "held_out.jsonl").is_file())


def run_comparison(output_dir: str | Path, job=None, config=None, *,
                   methods: Sequence["str | MethodSpec"] = METHODS, strengths: Sequence[float] | None = None,
                   benchmarks: Sequence[str] = tuple(BENCHMARKS), limits: str | int | dict | None = None,
                   judge=None, train_judge: bool = False, judge_steps: int = 100, judge_learning_rate: float = 5e-5,
                   judge_batch_size: int = 8, bbh_tasks: Sequence[str] | None = None, max_new_tokens: int = 128,
                   eval_batch_size: int = 8, eval_seed: int | None = None, data_dir=None, device: str | None = None,
                   dtype=None, train_argv: Sequence[str] | None = None, command: str | None = None,
                   progress: bool = True, log: Callable[[str], Any] = print) -> Comparison:
    """Train ``methods`` on one dataset and compare them with the base model on both sides of the
    trade-off; write ``results.md``, ``results.csv`` and ``tradeoff.png`` into ``output_dir``.

    Args:
        output_dir: the comparison folder: ``<method>/`` (each method's ``run_training`` output:
            ``adapter/`` with ``report.json``, ``split/``), ``judge/``, ``eval/<policy>/<evaluation>.json``.
        job, config: :class:`~qadapter.pipeline.JobArguments` and :class:`~qadapter.trainer.QAdapterConfig`
            shared by every method (``job.method`` and ``config.output_dir`` are set per method; LoRA
            rank, target modules, seed and split are therefore the same). None: ``qadapter train``'s
            defaults (the ``default`` preset on the embedded model and data).
        methods: method specs (:func:`parse_method_spec`): a method of :data:`METHOD_REGISTRY`
            (``qadapter``, ``sft``, ``replay``, ``dpo``, ``sft_kl``), optionally with settings of its
            own (``dpo:beta=0.3``, ``sft:max_steps=20``, ``sft_kl:kl_weight=1``); each is trained once
            into ``OUT/<method>[_<name>=<value>...]/``.
        strengths: decode-time strengths of every (residual) Q-Adapter spec: each is a policy
            ``qadapter@s`` of the ONE trained adapter (no retraining); preferences, KL and ARC
            score all strengths from the same forwards, the generated ones decode at each. None: the
            Q-Adapter at its trained setting only (policy ``qadapter``).
        benchmarks: retention evaluations among :data:`BENCHMARKS` (``kl``: KL from the base model).
            Held-out preference accuracy and margins are always measured.
        limits: subsample sizes (see :func:`parse_limits`; default :data:`DEFAULT_LIMITS`).
        judge: a reward model folder / hub id (``RewardModelJudge``) or any judge object; with
            ``train_judge=True`` one is trained on the training split (:func:`train_reward_judge`,
            ``judge_*`` settings) and saved to ``output_dir/judge``. Neither: no win rate.
        bbh_tasks: BBH tasks (default ``DEFAULT_BBH_TASKS``); ``max_new_tokens``: per generated answer
            (GSM8K, BBH, the KL's base answers, win-rate answers); ``data_dir``: benchmark files
            (default: the shipped copy); ``eval_seed``: subsample / bootstrap seed (default: ``config.seed``).
        train_argv, command: the ``qadapter train`` flags and the full command line, recorded in results.md.
    """
    import torch

    from .evaluation import (RewardModelJudge, base_policy, evaluate_arc, evaluate_bbh, evaluate_gsm8k,
                             evaluate_mmlu, evaluate_preferences, generate_texts, kl_from_base, load_policy, win_rate)
    from .evaluation.stats import make_metric, subsample
    from .evaluation.tasks import DEFAULT_BBH_TASKS
    from .pipeline import run_training

    if job is None or config is None:
        from .commands.train import parse

        default_job, default_config = parse([])
        job = job or default_job
        config = config or default_config
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [parse_method_spec(m) for m in methods]
    if not specs:
        raise ValueError(f"no method to compare; give method specs among {', '.join(METHOD_REGISTRY)}")
    names = [sp.name for sp in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"method specs must be distinct; got {', '.join(names)}")
    if strengths is not None:
        strengths = [float(x) for x in strengths]
        bad = [x for x in strengths if not (x > 0 and math.isfinite(x))]
        if bad or not strengths or len(set(strengths)) != len(strengths):
            raise ValueError(f"strengths must be distinct finite numbers > 0; got {strengths}")
        if not any(sp.method == "qadapter" for sp in specs):
            raise ValueError("strengths apply to a Q-Adapter: add a qadapter spec to the methods")
    points = policy_points(specs, strengths)
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose among {', '.join(BENCHMARKS)}")
    benchmarks = [b for b in BENCHMARKS if b in set(benchmarks)]
    if judge is not None and train_judge:
        raise ValueError("give a judge or train_judge=True, not both")
    limits = parse_limits(limits)
    eval_seed = config.seed if eval_seed is None else eval_seed
    bbh_tasks = list(bbh_tasks or DEFAULT_BBH_TASKS)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    # ---- the manifest: a resumed comparison must train with the same settings
    fingerprint = _training_fingerprint(job, config)
    manifest_path = out / "comparison.json"
    manifest = _read_json(manifest_path) if manifest_path.is_file() else {}
    # settings added to the fingerprint after a folder was made (absent there) do not count as changed
    differs = {k: v for k, v in fingerprint.items()
               if k in manifest.get("training", {}) and manifest["training"][k] != v}
    if manifest.get("training") and differs:
        changed = ", ".join(f"{k.removeprefix('job.')}: {manifest['training'].get(k)!r} -> {v!r}"
                            for k, v in differs.items())
        raise ValueError(f"{out} holds a comparison trained with other settings ({changed}); use another output "
                         "folder, or delete it")
    commands = list(manifest.get("commands", []))
    if command and (not commands or commands[-1] != command):
        commands.append(command)
    manifest.update(training=fingerprint, commands=commands)
    _write_json(manifest_path, manifest)

    # ---- 1. train (or reuse) every method, all on the same split
    trained: list[str] = []
    reports: dict[str, dict] = {}
    train_commands: dict[str, str] = {}
    for spec in tqdm(specs, desc="training methods", disable=not progress):
        method = spec.name
        folder = out / spec.folder
        spec_record = {"spec": spec.name, "method": spec.method, "params": dict(spec.params)}
        if train_argv is not None:
            train_commands[method] = _train_command(train_argv, spec, folder)
        if _method_done(folder):
            recorded = _read_json(folder / "spec.json") if (folder / "spec.json").is_file() else None
            if recorded is not None and recorded != spec_record:
                raise ValueError(f"{folder} was trained as {recorded.get('spec')!r}, not {spec.name!r}: use another "
                                 "output folder, or delete that one")
            reports[method] = _read_json(folder / "adapter" / "report.json")
            log(f"{method}: trained already ({folder / 'adapter'}), reusing it")
            continue
        # the comparison measures every policy itself (section 3), so training measures nothing
        m_job, m_config = spec.apply(job, config)
        m_job = dataclasses.replace(m_job, save_split=True, train_eval_pairs=0, measure_held_out=False,
                                    show_examples=0)
        m_config.output_dir = str(folder)
        if m_config.resume_from_checkpoint is None:
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
            if last:
                log(f"{method}: resuming from {last}")
                m_config.resume_from_checkpoint = last
        log(f"{method}: training into {folder}")
        reports[method] = run_training(m_job, m_config, log=log)
        _write_json(folder / "spec.json", spec_record)
        trained.append(method)
        _free_memory()
    for spec in specs:
        rep = reports[spec.name]
        if rep.get("model") != job.model or rep.get("seed") != config.seed or rep.get("method") != spec.method:
            raise ValueError(f"{out / spec.folder} was trained as method {rep.get('method')!r} on {rep.get('model')!r} "
                             f"with seed {rep.get('seed')}; this comparison asks for {spec.method!r} on {job.model!r} "
                             f"with seed {config.seed}: use another output folder, or delete that one")
    hashes = {sp.name: _sha256_files([out / sp.folder / "split" / "train.jsonl", out / sp.folder / "split" / "held_out.jsonl"])
              for sp in specs}
    if len(set(hashes.values())) != 1:
        raise RuntimeError(f"the methods were trained on different splits ({hashes}); delete {out} and rerun")
    split_dir = out / specs[0].folder / "split"
    train_pairs, held_out = _read_jsonl(split_dir / "train.jsonl"), _read_jsonl(split_dir / "held_out.jsonl")
    split_info = _read_json(split_dir / "split.json") if (split_dir / "split.json").is_file() else reports[specs[0].name]["split"]
    held_out_hash = _sha256_files([split_dir / "held_out.jsonl"])

    # ---- 2. the judge
    judge_obj, judge_info, judge_key = None, None, None

    def get_judge():
        nonlocal judge_obj
        if judge_obj is None:
            judge_obj = (RewardModelJudge(str(judge), device=device, batch_size=eval_batch_size)
                         if isinstance(judge, (str, Path)) else judge)
        return judge_obj

    if train_judge:
        judge_dir = out / "judge"
        if (judge_dir / "judge_report.json").is_file():
            log(f"judge: trained already ({judge_dir}), reusing it")
            judge_report = _read_json(judge_dir / "judge_report.json")
        else:
            judge_report = train_reward_judge(job.model, train_pairs, judge_dir, max_steps=judge_steps,
                                              learning_rate=judge_learning_rate, batch_size=judge_batch_size,
                                              max_length=config.max_length, seed=config.seed,
                                              use_cpu=bool(getattr(config, "use_cpu", False)) or device == "cpu",
                                              log=log)
            trained.append("judge")
        judge = str(judge_dir)
        judge_info = {"description": f"a reward model trained here from the base model with TRL's RewardTrainer on "
                                     f"the {judge_report['train_pairs']} training pairs ({judge_report['steps']} steps, "
                                     f"batch {judge_report['batch_size']}, learning rate {judge_report['learning_rate']:g}), "
                                     f"saved in `judge/`", "report": judge_report}
    if judge is not None:
        if isinstance(judge, (str, Path)):
            judge_key = {"path": str(Path(judge).resolve()) if Path(judge).exists() else str(judge),
                         "stamp": _folder_stamp(Path(judge)) if Path(judge).is_dir() else None}
            judge_info = judge_info or {"description": f"the reward model `{judge}` (sequence classification)"}
        else:
            judge_key = {"object": repr(judge)}
            judge_info = judge_info or {"description": f"`{judge!r}`"}
        # the judge's own held-out accuracy: how far its verdicts can be trusted
        acc_path = out / "eval" / "judge" / "held_out_accuracy.json"
        acc_key = {"judge": judge_key, "held_out": held_out_hash, "limit": limits["preferences"], "seed": eval_seed}
        cached = _read_json(acc_path) if acc_path.is_file() else None
        if cached and cached.get("key") == acc_key:
            judge_info["held_out_accuracy"] = cached["result"]
        elif hasattr(get_judge(), "rewards"):
            from .evaluation.preference import split_pair

            rows = subsample(held_out, limits["preferences"], eval_seed)
            prompts, chosen, rejected = zip(*(split_pair(r) for r in rows))
            rewards = get_judge().rewards(list(prompts) * 2, list(chosen) + list(rejected))
            n = len(rows)
            correct = _ties_half(np.asarray(rewards[:n]) - np.asarray(rewards[n:]))
            m = make_metric(correct, seed=eval_seed)
            judge_info["held_out_accuracy"] = {"value": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high, "n": n}
            _write_json(acc_path, {"key": acc_key, "result": judge_info["held_out_accuracy"]})
    else:
        log("no judge (give --judge PATH or --train-judge): the win rate is not measured")

    # ---- 3. evaluate the base model and every method through the same evaluators
    win_prompts: list = []
    if judge is not None:
        from .data import distinct_prompts

        prompts = [row["prompt"] if "prompt" in row else row["chosen"][:-1] for row in held_out]
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
        win_prompts = subsample(distinct_prompts(prompts), limits["win_rate"], eval_seed)
    evaluations = list(benchmarks) + ["preferences"] + (["win_rate"] if judge is not None else [])
    results: dict[str, dict[str, dict]] = {}
    computed: list[tuple[str, str]] = []
    common = dict(seed=eval_seed, progress=progress)

    def key_for(policy_name: str, policy_fp: str, evaluation: str, extra: dict | None = None) -> dict:
        k = {"policy": policy_name, "fingerprint": policy_fp, "evaluation": evaluation, "limit": limits.get(evaluation),
             "seed": eval_seed, "data_dir": str(data_dir) if data_dir else None}
        if evaluation in ("gsm8k", "bbh", "kl", "win_rate"):
            k["max_new_tokens"] = max_new_tokens
        if evaluation == "bbh":
            k["tasks"] = bbh_tasks
        if evaluation in ("preferences", "win_rate"):
            k["held_out"] = held_out_hash
        k.update(extra or {})
        return k

    def run_one(evaluation: str, policy, base, policy_name: str, reuse_answers=None):
        lim = limits.get(evaluation)
        if evaluation in ("mmlu0", "mmlu5"):
            return evaluate_mmlu(policy, n_shot=int(evaluation[-1]), limit=lim, batch_size=eval_batch_size,
                                 data_dir=data_dir, **common)
        if evaluation in ("arc_easy", "arc_challenge"):
            return evaluate_arc(policy, subset=evaluation[4:], limit=lim, batch_size=eval_batch_size,
                                data_dir=data_dir, **common)
        if evaluation == "gsm8k":
            return evaluate_gsm8k(policy, limit=lim, max_new_tokens=max_new_tokens, batch_size=eval_batch_size,
                                  data_dir=data_dir, **common)
        if evaluation == "bbh":
            return evaluate_bbh(policy, tasks=bbh_tasks, limit=lim, max_new_tokens=max_new_tokens,
                                batch_size=eval_batch_size, data_dir=data_dir, **common)
        if evaluation == "kl":
            if policy_name == "base":
                return kl_from_base(policy, base, limit=lim, max_new_tokens=max_new_tokens, data_dir=data_dir,
                                    batch_size=eval_batch_size, **common)
            ref = results["base"]["kl"]["extra"]
            return kl_from_base(policy, base, prompts=ref["prompts"], responses=ref["responses"],
                                max_new_tokens=max_new_tokens, batch_size=eval_batch_size, **common)
        if evaluation == "preferences":
            return evaluate_preferences(policy, base, held_out, limit=lim, batch_size=eval_batch_size, **common)
        if evaluation == "win_rate":
            if policy_name == "base":
                answers = reuse_answers or generate_texts(policy, win_prompts, max_new_tokens=max_new_tokens,
                                                          batch_size=eval_batch_size, progress=progress,
                                                          desc="win_rate: base answers")
                return win_rate(policy, base, get_judge(), prompts=win_prompts, policy_answers=answers,
                                base_answers=answers, max_new_tokens=max_new_tokens, **common)
            base_answers = results["base"]["win_rate"]["extra"]["base_answers"]
            return win_rate(policy, base, get_judge(), prompts=win_prompts, base_answers=base_answers,
                            policy_answers=reuse_answers, max_new_tokens=max_new_tokens, batch_size=eval_batch_size,
                            **common)
        raise ValueError(evaluation)

    # the points of one trained folder share one loaded model: a Q-Adapter's strengths are decoded
    # from the same weights (its settings' α's set per point), and scored from the same forwards
    groups: list[tuple[MethodSpec | None, list[PolicyPoint]]] = []
    for point in points:
        if groups and point.spec is not None and groups[-1][0] == point.spec:
            groups[-1][1].append(point)
        else:
            groups.append((point.spec, [point]))
    for spec, group in groups:
        policy_fp = f"model:{job.model}" if spec is None else _adapter_fingerprint(out / spec.folder / "adapter")
        todos: dict[str, list] = {}
        for point in group:
            policy_name = point.name
            folder = out / "eval" / point.folder
            extra_keys: dict[str, dict] = {}
            if "kl" in evaluations and policy_name != "base":
                extra_keys["kl"] = {"base_answers": results["base"]["kl"]["config"].get("answers_hash")}
            results[policy_name] = {}
            todo = []
            for evaluation in evaluations:
                k = key_for(policy_name, policy_fp, evaluation, extra_keys.get(evaluation))
                if point.strength is not None:
                    k["strength"] = point.strength
                if evaluation == "win_rate":
                    k["judge"] = judge_key
                    if policy_name != "base":
                        k["base_answers"] = results["base"]["win_rate"]["config"].get("answers_hash")
                path = folder / f"{evaluation}.json"
                cached = _read_json(path) if path.is_file() else None
                if cached and cached.get("key") == k:
                    results[policy_name][evaluation] = cached["result"]
                else:
                    todo.append((evaluation, k, path, cached))
            if todo:
                todos[policy_name] = todo
            else:
                log(f"{policy_name}: every evaluation cached in {folder}")
        if not todos:
            continue
        if spec is None:
            policy = load_policy(job.model, device=device, dtype=dtype)
            base = policy
        else:
            policy = load_policy(out / spec.folder / "adapter", base_model=job.model, device=device, dtype=dtype)
            base = base_policy(policy)
        saved_alphas = (policy.settings.alpha_0, policy.settings.alpha_tilde) if hasattr(policy, "settings") else None
        alphas: dict[str, tuple[float, float]] = {}
        for point in group:
            if point.strength is not None:
                try:
                    alphas[point.name] = policy.settings.decoding_alphas(strength=point.strength)
                except (AttributeError, ValueError) as e:
                    raise ValueError(f"{spec.name} at strength {point.strength:g}: {e}") from None
        # the scorer-based evaluations of every strength still to do: one scorer call for them all
        precomputed: dict[tuple[str, str], dict] = {}
        for evaluation in ("preferences", "kl", "arc_easy", "arc_challenge"):
            wanted = [pt for pt in group if pt.strength is not None and evaluation in
                      {e for e, *_ in todos.get(pt.name, [])}]
            if len(wanted) < 2:
                continue
            log(f"{spec.name}: {evaluation} at strengths {', '.join(f'{pt.strength:g}' for pt in wanted)} "
                "from the same forwards")
            if evaluation == "preferences":
                by_strength = _preferences_at_strengths(policy, held_out, [pt.strength for pt in wanted],
                                                        limit=limits.get("preferences"), seed=eval_seed,
                                                        batch_size=eval_batch_size, progress=progress)
            elif evaluation in ("arc_easy", "arc_challenge"):
                by_strength = _arc_at_strengths(policy, evaluation[4:], [pt.strength for pt in wanted],
                                                limit=limits.get(evaluation), seed=eval_seed,
                                                batch_size=eval_batch_size, data_dir=data_dir, progress=progress)
            else:
                ref = results["base"]["kl"]["extra"]
                by_strength = _kl_at_strengths(policy, [pt.strength for pt in wanted], prompts=ref["prompts"],
                                               responses=ref["responses"], max_new_tokens=max_new_tokens,
                                               seed=eval_seed, batch_size=eval_batch_size, progress=progress)
            for pt in wanted:
                precomputed[(pt.name, evaluation)] = by_strength[pt.strength].to_dict(samples=True)
        try:
            for point in group:
                policy_name = point.name
                if policy_name not in todos:
                    continue
                if policy_name in alphas:
                    policy.settings.alpha_0, policy.settings.alpha_tilde = alphas[policy_name]
                elif saved_alphas is not None:
                    policy.settings.alpha_0, policy.settings.alpha_tilde = saved_alphas
                log(f"{policy_name}: evaluating {', '.join(e for e, *_ in todos[policy_name])}")
                for evaluation, k, path, cached in tqdm(todos[policy_name], desc=f"evaluating {policy_name}",
                                                        disable=not progress):
                    reuse = None
                    if evaluation == "win_rate" and cached:
                        # only the judge changed: the policy's answers are still valid, only the verdicts are redone
                        old = cached.get("key", {})
                        if {a: b for a, b in old.items() if a != "judge"} == {a: b for a, b in k.items() if a != "judge"}:
                            reuse = cached["result"]["extra"].get("policy_answers") or None
                    result = precomputed.get((policy_name, evaluation))
                    if result is None:
                        result = run_one(evaluation, policy, base, policy_name, reuse).to_dict(samples=True)
                    if evaluation == "kl" and policy_name == "base":
                        result["config"]["answers_hash"] = hashlib.sha256(
                            json.dumps(result["extra"]["responses"]).encode()).hexdigest()[:16]
                    if evaluation == "win_rate" and policy_name == "base":
                        result["config"]["answers_hash"] = hashlib.sha256(
                            json.dumps(result["extra"]["base_answers"]).encode()).hexdigest()[:16]
                    _write_json(path, {"key": k, "result": result})
                    results[policy_name][evaluation] = result
                    computed.append((policy_name, evaluation))
        finally:
            if saved_alphas is not None:
                policy.settings.alpha_0, policy.settings.alpha_tilde = saved_alphas
        del policy, base
        _free_memory()

    # ---- 4. write the tables and the plot
    lora = (f"LoRA r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, "
            f"target modules {config.lora_target_modules}")
    info = {"model": job.model, "data": reports[specs[0].name].get("data", job.data), "split": split_info,
            "train_seed": config.seed, "eval_seed": eval_seed, "lora": lora, "commands": commands,
            "train_commands": train_commands, "training_settings": fingerprint, "reports": reports,
            "judge": judge_info, "limits": limits, "bbh_tasks": bbh_tasks, "max_new_tokens": max_new_tokens,
            "specs": [sp.name for sp in specs], "strengths": strengths,
            "points": [_point_record(pt) for pt in points]}
    comparison = Comparison(out, [pt.name for pt in points[1:]], benchmarks, results, info, trained, computed)
    comparison.paths = write_results(comparison)
    log(f"results: {comparison.paths['md']}, {comparison.paths['csv']}, {comparison.paths['png']}")
    return comparison
