"""The frontier of a comparison: retention (KL, ARC-Easy) on x against preference (margin accuracy,
preference accuracy, win rate) on y, every policy point with both intervals; a Q-Adapter's
strengths joined as one curve, each baseline's specs joined per method (``frontier.png`` and the
"Frontier" table of results.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ...io import save_figure
from .evaluations import BENCHMARKS, Column
from .results import Comparison, cell, metric, table


#: the frontier's axes: retention (x) and preference (y), each drawn where it was measured
FRONTIER_X = ("kl", "arc_easy", "ifeval", "fluency")
#: x-axis labels other than "<label> accuracy (→ more retained)"
X_LABELS = {"kl": "KL(π‖π1) from the base, nats/token (← closer to the base)",
            "fluency": "fluency: repeated 4-grams per answer (← loops less)"}
#: how the frontier table's text names an x axis, where its label alone would not say which way is better
X_NOTES = {"kl": "KL(π‖π1) from the base on general prompts, lower is closer to the base",
           "fluency": "repeated 4-grams in the answers to general prompts, lower loops less"}


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
    measured = lambda c: any(metric(comparison.results.get(p, {}), c) for p in comparison.policies)  # noqa: E731
    xs = [BENCHMARKS[k] for k in FRONTIER_X if k in comparison.benchmarks and measured(BENCHMARKS[k])]
    ys = [by_key[k] for k in FRONTIER_Y if k in by_key and measured(by_key[k])]
    return xs, ys


def frontier_section(comparison: Comparison, columns: Sequence[Column]) -> list[str]:
    xs, ys = _frontier_axes(comparison, columns)
    head = ["point", "method", "setting"] + [c.label for c in xs + ys]
    rows = []
    for r in _frontier_points(comparison):
        res = comparison.results.get(r["name"], {})
        rows.append([f"**{r['name']}**" if r["name"] == "base" else r["name"], r.get("method", ""),
                     r.get("setting") or "—"] + [cell(metric(res, c), with_n=True) for c in xs + ys])
    strengths = comparison.info.get("strengths")
    return ["## Frontier", "",
            "Every evaluated policy is a point: retention on x (" + "; ".join(X_NOTES.get(c.key, c.label) for c in xs)
            + "), preference on y (held-out margin accuracy and preference "
            "accuracy" + (", the judged win rate against the base" if any(c.key == "win_rate" for c in ys) else "")
            + "). " + (f"A Q-Adapter is ONE trained adapter decoded at strengths {', '.join(f'{x:g}' for x in strengths)} "
                       "(π̃ ∝ π1·exp(s·(zθ − z1)); s = 1 is the trained policy), joined as one curve; " if strengths else "")
            + "each baseline's trained settings (DPO's β, the training budgets, sft_kl's weight) are joined as one "
              "curve per method; the base is the black star. Each cell: value [bootstrap 95% interval] (n = items).",
            "", table(head, rows), "", "![frontier](frontier.png)", ""]


def plot_frontier(path: Path, comparison: Comparison, columns: Sequence[Column]) -> Path | None:
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
                    x, y = metric(res, xcol), metric(res, ycol)
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
            bx, by = metric(comparison.results.get("base", {}), xcol), metric(comparison.results.get("base", {}), ycol)
            if bx and by:
                ax.errorbar([bx["value"]], [by["value"]],
                            xerr=[[max(0.0, bx["value"] - bx["ci_low"])], [max(0.0, bx["ci_high"] - bx["value"])]],
                            yerr=[[max(0.0, by["value"] - by["ci_low"])], [max(0.0, by["ci_high"] - by["value"])]],
                            fmt="*", color="black", markersize=12, capsize=3, zorder=5, label="base")
            n_x = {(metric(comparison.results.get(p, {}), xcol) or {}).get("n") for p in comparison.policies} - {None}
            n_y = {(metric(comparison.results.get(p, {}), ycol) or {}).get("n") for p in comparison.policies} - {None}
            ax.set_xlabel(X_LABELS.get(xcol.key, f"{xcol.label} accuracy (→ more retained)")
                          + (f", n={n_x.pop()}" if len(n_x) == 1 else ""))
            ax.set_ylabel(f"held-out {ycol.label}" + (f", n={n_y.pop()}" if len(n_y) == 1 else ""))
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle("Frontier: preference (y) against retention (x); bars: bootstrap 95% intervals", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
