"""Paired differences between two evaluated policies, item by item, with bootstrap 95% intervals.

Reads the per-item samples that ``qadapter compare`` caches (``DIR/eval/<policy>/<evaluation>.json``)
and prints, for every evaluation both policies have, the mean of (A − B) over the items they share
and its percentile bootstrap interval (qadapter.evaluation.stats.bootstrap_ci, 2000 resamples,
seed 0); ``*`` marks an interval that excludes 0. The two policies may live in different comparison
folders that evaluated the same items (e.g. the same held-out split with and without label noise);
an evaluation whose results drew different items (another limit, seed or held-out split: their
cache keys say so) is printed as "not paired", except IFEval, whose samples name their prompt and
so pair over the prompts both answered (n = 60 against all 541: the 60)::

    python scripts/paired_differences.py runs/e27:qadapter runs/e27:base
    python scripts/paired_differences.py runs/noise_0.4:qadapter runs/noise_0:qadapter

Given four policies, A B C D, it prints the difference of differences (A − B) − (C − D) item by
item, e.g. whether label noise cost the Q-Adapter less than matched DPO::

    python scripts/paired_differences.py runs/noise_0.4:qadapter runs/noise_0:qadapter \
        runs/noise_0.4:qadapter_alpha_tilde=1_beta=0 runs/noise_0:qadapter_alpha_tilde=1_beta=0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qadapter.evaluation.stats import bootstrap_ci, ratio_metric, ties_half
from qadapter.recipes.compare.evaluations import REGISTRY

#: multiple-choice evaluations: their samples hold pred and gold; "correct" is compare's own item
#: score of each (REGISTRY[...].item_score: 1 for a correct answer)
MULTIPLE_CHOICE = ("mmlu0", "mmlu5", "arc_easy", "arc_challenge")
#: the per-item sample fields compared, per evaluation
FIELDS = {"preferences": ("margin", "margin_accuracy"), "kl": ("kl",), **{name: ("correct",) for name in MULTIPLE_CHOICE},
          "ifeval": ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc", "inst_level_loose_acc"),
          "fluency": ("repeated_4grams", "distinct_2", "length", "base_nll", "at_cap")}
#: IFEval's instruction-level accuracies pool the instructions of all prompts: an item's field holds one
#: verdict per instruction, and the paired difference is Σ(followed A − followed B) / Σ instructions,
#: resampled by prompt as compare's own interval is (qadapter.evaluation.stats.ratio_metric)
POOLED = ("inst_level_strict_acc", "inst_level_loose_acc")
#: the sample field that names the item itself, where there is one (IFEval's prompt key): results of
#: different limits then pair over the prompts they share. Elsewhere a sample's "index" is its place
#: in the evaluated subsample, so two results pair only when they drew the same subsample:
ITEM_ID = {"ifeval": "key"}
#: the cache-key fields that decide which items an evaluation drew
SUBSAMPLE = ("limit", "seed", "data_dir", "held_out", "trained_prompts_left_out")


def samples(folder: Path, policy: str, evaluation: str) -> tuple[dict, dict] | None:
    """(cache key, {item: sample}) of a cached result, or None when it was not evaluated."""
    path = folder / "eval" / policy / f"{evaluation}.json"
    if not path.is_file():
        return None
    cached = json.loads(path.read_text())
    items = {}
    for i, sample in enumerate(cached["result"]["samples"]):
        if evaluation in MULTIPLE_CHOICE:
            sample = {**sample, "correct": REGISTRY[evaluation].item_score(sample)}
        if evaluation == "preferences" and sample.get("margin") is not None:
            # the item's share of margin accuracy (ties half), the scale-free side of the margin
            sample = {**sample, "margin_accuracy": float(ties_half(np.asarray([sample["margin"]]))[0])}
        items[sample.get(ITEM_ID.get(evaluation), sample.get("index", i))] = sample
    return cached.get("key", {}), items


def other_subsample(evaluation: str, keys: list[dict]) -> str | None:
    """Why results of ``evaluation`` with these cache keys cannot be paired by index, or None."""
    if evaluation in ITEM_ID:
        return None
    differ = [field for field in SUBSAMPLE if len({repr(key.get(field)) for key in keys}) > 1]
    if not differ:
        return None
    return "they drew different items (" + "; ".join(
        f"{field}: " + " vs ".join(repr(key.get(field)) for key in keys) for field in differ) + ")"


def paired(a: dict, b: dict, field: str, n_boot: int = 2000, seed: int = 0, c: dict | None = None,
           d: dict | None = None):
    """(mean of a − b, ci_low, ci_high, n) over the items both have a value for, or None; with c and
    d, of (a − b) − (c − d) over the items all four have."""
    others = [x for x in (c, d) if x is not None]
    keys = [k for k in a if all(k in x and x[k].get(field) is not None for x in (a, b, *others))]
    if not keys:
        return None

    def values(x: dict) -> np.ndarray:
        if field in POOLED:
            return np.array([float(sum(x[k][field])) for k in keys])
        return np.array([float(x[k][field]) for k in keys])

    diff = values(a) - values(b)
    if others:
        diff -= values(c) - values(d)
    if field in POOLED:
        instructions = np.array([float(len(a[k][field])) for k in keys])
        metric = ratio_metric(diff, instructions, n_boot=n_boot, seed=seed)
        return metric.value, metric.ci_low, metric.ci_high, len(keys)
    low, high = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    return float(diff.mean()), low, high, len(keys)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="DIR:POLICY, e.g. runs/e27:qadapter")
    parser.add_argument("b", help="DIR:POLICY, e.g. runs/e27:base")
    parser.add_argument("c", nargs="?", help="DIR:POLICY: with D, print (A − B) − (C − D)")
    parser.add_argument("d", nargs="?", help="DIR:POLICY")
    args = parser.parse_args(argv)
    if (args.c is None) != (args.d is None):
        parser.error("give C and D together (the difference of differences), or neither")
    names = [x for x in (args.a, args.b, args.c, args.d) if x is not None]
    label = f"{args.a} − {args.b}" + (f" − ({args.c} − {args.d})" if args.c else "")
    for evaluation, fields in FIELDS.items():
        cached = [samples(Path(folder), policy, evaluation) for folder, policy in (n.rsplit(":", 1) for n in names)]
        if not all(cached):
            continue
        reason = other_subsample(evaluation, [key for key, _ in cached])
        if reason:
            print(f"{label}  {evaluation}: not paired: {reason}")
            continue
        policies = [items for _, items in cached]
        for field in fields:
            r = paired(policies[0], policies[1], field, **dict(zip("cd", policies[2:])))
            if r:
                mean, low, high, n = r
                mark = " *" if low > 0 or high < 0 else ""
                print(f"{label}  {evaluation}.{field}: {mean:+.4f} [{low:+.4f}, {high:+.4f}] (n={n}){mark}")


if __name__ == "__main__":
    main()
