"""Plots people would rather look at than read: training curves (``qadapter train``, ``qadapter compare``).

The trade-off plot of a comparison lives with the comparison (:mod:`qadapter.recipes.compare.report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .io import save_figure

#: the logged metrics drawn, by panel: (log key, panel title); a panel is drawn only when some run logged it
CURVE_PANELS = (
    ("loss", "training loss (each method's own objective)"),
    ("rewards/accuracies", "rewards/accuracies (training batches)"),
    ("rewards/margins", "rewards/margins (training batches)"),
)


def _series(history: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    points = [(h["step"], float(h[key])) for h in history if key in h and "step" in h]
    return [s for s, _ in points], [v for _, v in points]


def plot_training_curves(histories: Mapping[str, Sequence[Mapping]], path: str | Path,
                         title: str = "Training curves") -> Path | None:
    """Draw each run's logged training metrics against the step into ``path`` (a PNG, written atomically).

    ``histories`` maps a run name (e.g. a method) to its ``trainer.state.log_history``. Returns the
    path, or None when nothing was logged (no file is written then).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(key, label) for key, label in CURVE_PANELS
              if any(_series(h, key)[0] for h in histories.values())]
    if not panels:
        return None
    fig = Figure(figsize=(5.0 * len(panels), 4.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, label) in zip(axes, panels):
        for i, (name, history) in enumerate(histories.items()):
            steps, values = _series(history, key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, color=f"C{i}", label=name)
            if key == "loss":
                # a Q-Adapter's loss = Bradley-Terry term + β·χ² term: show which one is moving
                for part, style, what in (("pref_loss", "--", "BT term"), ("chi2_loss", ":", "β·χ² term")):
                    part_steps, part_values = _series(history, part)
                    if part_steps:
                        ax.plot(part_steps, part_values, ls=style, color=f"C{i}", label=f"{name}: {what}")
        if key == "rewards/accuracies":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
