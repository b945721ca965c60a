"""Result objects, the shared bootstrap interval and deterministic subsampling."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "Metric", "EvalResult", "make_metric", "ratio_metric", "subsample"]


def bootstrap_means(x: np.ndarray, n_boot: int, rng) -> np.ndarray:
    """``n_boot`` means of ``x`` resampled with replacement (drawn from ``rng``), in blocks that bound memory."""
    out = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, min(n_boot, 2_000_000 // max(1, x.size)))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        out[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    return out


def ties_half(x: np.ndarray) -> np.ndarray:
    """1 where x > 0, 0 where x < 0, 0.5 at a tie: a pairwise win with ties counted half."""
    return np.where(x > 0, 1.0, np.where(x < 0, 0.0, 0.5))


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, *,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval (95% by default) of the mean of ``values``: the items are
    resampled with replacement ``n_boot`` times. Deterministic for a given ``seed``. Constant values
    give a zero-width interval; no value gives (nan, nan).
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    if np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    stats = bootstrap_means(x, n_boot, np.random.default_rng(seed))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return (float(low), float(high))


@dataclass
class Metric:
    """One number with its bootstrap 95% interval."""

    value: float
    ci_low: float
    ci_high: float

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.ci_low:.4f}, {self.ci_high:.4f}]"


def make_metric(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> Metric:
    """The mean of ``values`` and :func:`bootstrap_ci` of it."""
    x = [float(v) for v in values]
    low, high = bootstrap_ci(x, n_boot=n_boot, seed=seed)
    return Metric(float(np.mean(x)) if x else math.nan, low, high)


def ratio_metric(numerators: np.ndarray, weights: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Metric:
    """Σ numerators / Σ weights (a pooled rate, e.g. instructions followed over instructions given)
    with a bootstrap over items: the two means are resampled with the same indices (two generators of
    one seed), so their ratio is the resampled pooled rate."""
    if weights.size == 0:
        return Metric(math.nan, math.nan, math.nan)
    value = float(numerators.sum() / weights.sum())
    ratios = (bootstrap_means(numerators, n_boot, np.random.default_rng(seed))
              / bootstrap_means(weights, n_boot, np.random.default_rng(seed)))
    low, high = np.quantile(ratios, [0.025, 0.975])
    # clamped: where every item has the same rate the float ratios may land an ulp beside the value
    return Metric(value, float(min(low, value)), float(max(high, value)))


@dataclass
class EvalResult:
    """What every evaluator returns.

    ``metrics`` maps metric names to :class:`Metric` (value + 95% interval); ``primary`` names the
    headline one (``score``, ``ci``). ``n`` is the number of scored items; ``config`` the settings that
    produced it (task, n_shot, limit, seed ...); ``extra`` anything else worth keeping (per-task
    scores, generated answers to reuse); ``samples`` per-item records for inspection.
    """

    task: str
    n: int
    metrics: dict[str, Metric]
    primary: str
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def score(self) -> float:
        return self.metrics[self.primary].value

    @property
    def ci(self) -> tuple[float, float]:
        m = self.metrics[self.primary]
        return (m.ci_low, m.ci_high)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key].value

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        out = {"task": self.task, "n": self.n, "primary": self.primary, "score": self.score,
               "ci": list(self.ci), "metrics": {k: dataclasses.asdict(v) for k, v in self.metrics.items()},
               "config": self.config, "extra": self.extra}
        if samples:
            out["samples"] = self.samples
        return out

    def to_json(self, samples: bool = False, **kwargs) -> str:
        return json.dumps(self.to_dict(samples), default=str, **kwargs)

    def __str__(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self.metrics.items())
        return f"{self.task} (n={self.n}): {parts}"


def subsample(items: Sequence[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """At most ``limit`` items drawn without replacement by a seeded RNG, in their original order.

    The same (items, limit, seed) always gives the same subset (so every policy is scored on the
    same items). ``limit=None`` (or >= len) keeps everything.
    """
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at small n and near 0 or 1)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def preference_accuracy(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Fraction of pairs whose chosen response is more likely (ties count half), with a 95% interval."""
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    n = len(chosen)
    low, high = wilson_interval(wins, n)
    return {"accuracy": wins / n if n else float("nan"), "n": n, "ci_low": low, "ci_high": high}
