"""The results of a comparison (:class:`Comparison`) and how one reported number is read from them
and printed (shared by the report and the frontier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evaluations import Column


def metric(results: dict, column: Column) -> dict[str, Any] | None:
    r = results.get(column.evaluation)
    if not r or column.metric not in r.get("metrics", {}):
        return None
    m = r["metrics"][column.metric]
    return {"value": m["value"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "n": r["n"]}


# --------------------------------------------------------------------------- writers
def fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if v == 0 or 0.01 <= abs(v) < 1000:
        return f"{v:.3f}"
    return f"{v:.2e}"


def cell(m: dict | None, with_n: bool = False) -> str:
    if m is None:
        return "—"
    text = f"{fmt(m['value'])} [{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]"
    return text + (f" (n={m['n']})" if with_n else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


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
