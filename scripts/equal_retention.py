"""Is a Q-Adapter's strength curve above a baseline at equal retention? Paired bootstrap intervals.

One trained Q-Adapter decoded at several strengths is a curve through the retention–preference
plane (strength 0 is the base model itself, so ``base`` is its first point); a baseline is one
point. This reads the per-item samples ``qadapter compare`` caches (``DIR/eval/<policy>/<evaluation>.json``),
interpolates the curve linearly at the baseline's retention (x) and prints the curve's preference
(y) there minus the baseline's, with a percentile bootstrap interval: each resample draws the
x items and the y items (independently: they are different prompts) once and uses that draw for
every policy, so the comparison stays paired. ``*`` marks an interval that excludes 0. A baseline
whose retention lies outside the curve's range gets no number (no extrapolation); the share of
resamples in which it fell inside the range is printed beside every interval::

    python scripts/equal_retention.py runs/e29 --curve base qadapter@0.5 qadapter@1 qadapter@2 \
        --against dpo replay sft_kl

Higher y is more preferred for both default y fields, so a positive difference means the curve
lies above the baseline at the baseline's retention.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from paired_differences import samples

#: retention measures (x) and preference measures (y), as EVALUATION.FIELD of compare's samples
X_FIELDS = ("kl.kl", "fluency.repeated_4grams", "fluency.base_nll", "ifeval.prompt_level_strict_acc",
            "arc_easy.correct")
Y_FIELDS = ("preferences.margin_accuracy", "preferences.margin")


def item_matrix(folder: Path, policies: list[str], measure: str) -> np.ndarray | None:
    """(policies, items) values of ``measure`` over the items every policy has; None when one of
    them was not evaluated."""
    evaluation, field = measure.split(".", 1)
    cached = [samples(folder, p, evaluation) for p in policies]  # one folder: the same items drawn
    if not all(cached):
        return None
    per_policy = [items for _, items in cached]
    keys = [k for k in per_policy[0] if all(k in s and s[k].get(field) is not None for s in per_policy)]
    if not keys:
        return None
    return np.array([[float(s[k][field]) for k in keys] for s in per_policy])


def curve_minus_point(x: np.ndarray, y: np.ndarray) -> float:
    """y of the curve (points 0..n-2, in order, joined by straight lines) at the x of the last point,
    minus the last point's y; nan when no segment spans that x. Where x is not monotone along the
    curve (repeated 4-grams can be), the first spanning segment, the lowest strength, is used.
    ``x``, ``y``: (n,) means."""
    xb, yb = x[-1], y[-1]
    for k in range(len(x) - 2):
        lo, hi = x[k], x[k + 1]
        if min(lo, hi) <= xb <= max(lo, hi):
            t = 0.0 if hi == lo else (xb - lo) / (hi - lo)
            return float(y[k] + t * (y[k + 1] - y[k]) - yb)
    return float("nan")


def compare_at_equal_x(X: np.ndarray, Y: np.ndarray, n_boot: int = 2000, seed: int = 0):
    """The curve (rows 0..n-2) minus the baseline (last row) at the baseline's x, from (policies,
    items) matrices: (estimate, ci_low, ci_high, share of resamples inside the curve's range)."""
    estimate = curve_minus_point(X.mean(axis=1), Y.mean(axis=1))
    rng = np.random.default_rng(seed)
    draws = np.array([curve_minus_point(X[:, rng.integers(0, X.shape[1], X.shape[1])].mean(axis=1),
                                        Y[:, rng.integers(0, Y.shape[1], Y.shape[1])].mean(axis=1))
                      for _ in range(n_boot)])
    inside = draws[~np.isnan(draws)]
    if inside.size == 0:
        return estimate, float("nan"), float("nan"), 0.0
    low, high = np.quantile(inside, [0.025, 0.975])
    return estimate, float(low), float(high), inside.size / n_boot


def measure_name(text: str) -> str:
    evaluation, _, field = text.partition(".")
    if not evaluation or not field:
        raise argparse.ArgumentTypeError(f"{text!r}: give EVALUATION.FIELD, e.g. kl.kl or preferences.margin")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a qadapter compare output folder, e.g. runs/e29")
    parser.add_argument("--curve", nargs="+", required=True,
                        help="the curve's points in strength order, e.g. base qadapter@0.5 qadapter@1 qadapter@2")
    parser.add_argument("--against", nargs="+", required=True, help="the baseline points, e.g. dpo replay sft_kl")
    parser.add_argument("--x", nargs="+", type=measure_name, default=list(X_FIELDS), help="retention measures EVALUATION.FIELD")
    parser.add_argument("--y", nargs="+", type=measure_name, default=list(Y_FIELDS), help="preference measures EVALUATION.FIELD")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args(argv)
    if len(args.curve) < 2:
        parser.error("--curve needs at least two points (e.g. base and the Q-Adapter at strength 1)")
    missing = [p for p in args.curve + args.against if not (args.folder / "eval" / p).is_dir()]
    if missing:
        parser.error(f"{args.folder / 'eval'} holds no evaluated policy {', '.join(missing)}: "
                     "name the points as that folder does (e.g. base, qadapter@0.5, dpo)")
    for baseline in args.against:
        policies = args.curve + [baseline]
        # read once per baseline, not once per retention measure
        ys = {m: Y for m in args.y if (Y := item_matrix(args.folder, policies, m)) is not None}
        for x_measure in args.x:
            X = item_matrix(args.folder, policies, x_measure)
            if X is None:
                continue
            xs = X.mean(axis=1)
            for y_measure, Y in ys.items():
                head = f"{baseline} at equal {x_measure} = {xs[-1]:.4f}: curve − {baseline} in {y_measure}"
                estimate, low, high, share = compare_at_equal_x(X, Y, n_boot=args.n_boot)
                if np.isnan(estimate):
                    print(f"{head}: outside the curve (its {x_measure} spans {xs[:-1].min():.4f} .. "
                          f"{xs[:-1].max():.4f}); not extrapolated")
                    continue
                mark = " *" if low > 0 or high < 0 else ""
                print(f"{head}: {estimate:+.4f} [{low:+.4f}, {high:+.4f}] (n={X.shape[1]}/{Y.shape[1]}, "
                      f"inside in {share:.0%} of resamples){mark}")


if __name__ == "__main__":
    main()
