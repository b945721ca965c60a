"""The comparison's report: the trade-off statistics, results.md, results.csv, tradeoff.png and
frontier.png.
"""

from __future__ import annotations

import csv
import io
import shlex
import textwrap

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...evaluation.stats import bootstrap_means
from ...io import save_figure, write_text_atomically
from .evaluations import (BENCHMARKS, PREFERENCE_COLUMNS, REPETITION_COLUMN, RETENTION_BENCHMARKS, WIN_RATE_COLUMN,
                          Column, item_scores)
from .frontier import frontier_section, plot_frontier
from .methods import METHOD_REGISTRY, MethodSpec, number_text, parse_method_spec
from .results import Comparison, cell, metric, table

def _mean_difference(pairs: list[tuple[dict, dict, str]], *, sign: float = 1.0, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, Any] | None:
    """Mean over evaluations of sign·(mean score of a − mean score of b), with a percentile bootstrap
    95% interval: items are resampled within each evaluation, paired (the per-item difference) when
    both sides scored the same items, independently otherwise."""
    rng = np.random.default_rng(seed)
    values, boots, n_items, paired_all = [], np.zeros(n_boot), 0, True
    for a, b, evaluation in pairs:
        sa, sb = item_scores(evaluation, a), item_scores(evaluation, b)
        if sa is None or sb is None or not len(sa[1]) or not len(sb[1]):
            return None
        if sa[0] == sb[0]:
            diff = sign * (sa[1] - sb[1])
            values.append(diff.mean())
            boots += bootstrap_means(diff, n_boot, rng)
            n_items += diff.size
        else:
            paired_all = False
            values.append(sign * (sa[1].mean() - sb[1].mean()))
            boots += sign * (bootstrap_means(sa[1], n_boot, rng) - bootstrap_means(sb[1], n_boot, rng))
            n_items += min(sa[1].size, sb[1].size)
    if not values:
        return None
    boots /= len(values)
    low, high = np.quantile(boots, [0.025, 0.975])
    return {"value": float(np.mean(values)), "ci_low": float(low), "ci_high": float(high), "n": n_items,
            "n_evaluations": len(values), "paired": paired_all}

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
        row["kl"] = metric(r, BENCHMARKS["kl"]) if "kl" in benchmarks else None
        row["preference_gained"] = (_mean_difference([(r["preferences"], base["preferences"], "preferences")],
                                                     n_boot=n_boot, seed=seed)
                                    if "preferences" in r and "preferences" in base else None)
        row["win_rate"] = metric(r, WIN_RATE_COLUMN)
        out[method] = row
    return out

def _columns(benchmarks: Sequence[str], judged: bool) -> list[Column]:
    cols = [BENCHMARKS[b] for b in BENCHMARKS if b in benchmarks]
    cols += list(PREFERENCE_COLUMNS)
    if judged:
        cols += [WIN_RATE_COLUMN, REPETITION_COLUMN]
    return cols

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

    write_csv(paths["csv"], comparison, trade, points)
    # ---- the plot
    _plot(paths["png"], trade, comparison)
    frontier = plot_frontier(out / "frontier.png", comparison, columns)
    if frontier:
        paths["frontier"] = frontier
    from ...plots import plot_training_curves

    histories = {m: ((info.get("reports") or {}).get(m) or {}).get("log_history") for m in specs}
    curves = plot_training_curves({m: h for m, h in histories.items() if h}, out / "training_curves.png",
                                  title="Training curves of the compared methods")
    if curves:
        paths["curves"] = curves

    md = results_markdown(comparison, columns, trade, judged, specs, paths)
    md += how_made_markdown(comparison, specs, paths)
    write_text_atomically(paths["md"], "\n".join(md))
    return paths


def write_csv(path: Path, comparison: Comparison, trade: dict, points: dict) -> None:
    """results.csv: one row per policy, every number with its interval and n (win rate empty when not measured)."""
    csv_columns = _columns(comparison.benchmarks, True)
    header = ["policy", "method", "setting"]
    for c in csv_columns:
        header += [c.key, f"{c.key}_ci_low", f"{c.key}_ci_high", f"{c.key}_n"]
    for t in ("retention_lost", "preference_gained"):
        header += [t, f"{t}_ci_low", f"{t}_ci_high", f"{t}_n"]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    for policy in comparison.policies:
        record = points.get(policy) or {}
        cells = [policy, record.get("method", policy if policy == "base" else policy.split(":")[0].split("@")[0]),
                 record.get("setting", "")]
        metrics = [metric(comparison.results.get(policy, {}), c) for c in csv_columns]
        if policy == "base":
            zero = {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": ""}
            metrics += [zero, zero]
        else:
            metrics += [trade[policy]["retention_lost"], trade[policy]["preference_gained"]]
        for m in metrics:
            cells += ["", "", "", ""] if m is None else [m["value"], m["ci_low"], m["ci_high"], m["n"]]
        writer.writerow(cells)
    write_text_atomically(path, buffer.getvalue())



def results_markdown(comparison: Comparison, columns, trade: dict, judged: bool, specs: list[str],
                     paths: dict) -> list[str]:
    """results.md's opening, main table, frontier and trade-off sections."""
    info, seed = comparison.info, comparison.info.get("eval_seed", 0)
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
    if info.get("general_prompts_left_out"):
        md.append(f"- **General prompts** (KL, fluency): the {info['general_prompts_left_out']} that are also "
                  "training prompts were left out before drawing, so no retention measure asks what a method "
                  "trained on.")
    md.append(f"- **Seeds**: training and split seed {info.get('train_seed')}; evaluation seed {seed} "
              "(benchmark subsamples and bootstrap intervals).")
    if info.get("lora"):
        md.append(f"- **Adapter** (every method): {info['lora']}.")
    md.append("")

    # main table
    n_header = {}
    for c in columns:
        ns = {(metric(comparison.results.get(p, {}), c) or {}).get("n") for p in comparison.policies} - {None}
        n_header[c.key] = ns.pop() if len(ns) == 1 else None
    head = ["policy"] + [c.label + (f" (n={n_header[c.key]})" if n_header[c.key] is not None else "") for c in columns]
    rows = [[f"**{p}**" if p == "base" else p] +
            [cell(metric(comparison.results.get(p, {}), c), with_n=n_header[c.key] is None) for c in columns]
            for p in comparison.policies]
    md += ["## Results", "", "Each cell: value [bootstrap 95% interval]; n = items scored.", "", table(head, rows), ""]
    if judged:
        md += ["Win rate: the judge's verdict on each policy's greedy answer to a held-out prompt against the base "
               "model's (0.5 = no change); repeated 4-grams: the mean over those answers of the fraction of each "
               "answer's word 4-grams it had already said (0 = no phrase repeated; degeneration a judge may miss).", ""]
    else:
        md += ["Win rate: **not measured** (no judge: pass `--judge PATH_TO_REWARD_MODEL` or `--train-judge`).", ""]

    # trade-off table
    head = ["method", "retention lost", "KL(π‖π1)", "preference gained", "win rate vs base"]
    rows = [[m, cell(trade[m]["retention_lost"], True), cell(trade[m]["kl"], True),
             cell(trade[m]["preference_gained"], True),
             cell(trade[m]["win_rate"], True) if judged else "not measured"] for m in comparison.methods]
    retention = [BENCHMARKS[b].label for b in comparison.benchmarks if b in RETENTION_BENCHMARKS]
    if "frontier" in paths:
        md += frontier_section(comparison, columns)
    md += ["## Trade-off against the base model", "",
           f"Retention lost: mean over {', '.join(retention) if retention else '(no retention benchmark)'} of "
           "(base score − method score), items paired. Preference gained: held-out preference accuracy "
           "of the method − the base model's, pairs paired. Lower-right of the plot is worse, upper-left better.",
           "", table(head, rows), "", "![trade-off](tradeoff.png)", ""]

    return md


def how_made_markdown(comparison: Comparison, specs: list[str], paths: dict) -> list[str]:
    """results.md's last section: commands, training runs, judge, subsamples, definitions."""
    info = comparison.info
    md = []
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
           table(["method", "steps", "training pairs", "seconds", "stopped by the time limit at step"], train_rows), ""]
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
                     f"{cell(acc, True)}")
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
    return md


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
    save_figure(fig, path, dpi=120)

def train_command(train_argv: Sequence[str], spec: "MethodSpec | str", folder: Path) -> str:
    """The ``qadapter train`` command line that trains ``spec`` exactly as the comparison did."""
    spec = parse_method_spec(spec)
    own = []
    for k, v in spec.params:
        own += [f"--{METHOD_REGISTRY[spec.method].params[k].field}", number_text(v)]
    return shlex.join(["qadapter", "train", *train_argv, "--method", spec.method, *own, "--output_dir", str(folder),
                       "--save_split", "true"])

