"""How many items of each evaluation a comparison scores: ``--eval-limit`` parsed against the
registry's defaults."""

from __future__ import annotations

from .evaluations import DEFAULT_LIMITS


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
