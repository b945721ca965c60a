"""Errors a user can fix, defined once, and how options are spelled in their messages.

``UserError`` is bad input (a data file, a flag, a path, a module name, a checkpoint): the CLI prints
its message on stderr and exits 2 without a traceback (``--debug`` shows it). It is a ``ValueError``,
so Python callers that catch ``ValueError`` keep working. ``SaveError`` is a write that failed (no
space left, permission denied): the message says what was being written and that the previous copy
is intact; the CLI prints it and exits 1.

Messages name options in the spelling of the interface in use: ``skip_invalid=True`` for the Python
API, ``--skip_invalid`` on the command line (the CLI runs inside :func:`cli_spelling`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

_CLI = contextvars.ContextVar("qadapter_cli_spelling", default=False)


class UserError(ValueError):
    """Input the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """An invalid setting (a knob out of range, a module name that does not exist)."""


class SaveError(OSError):
    """A save that failed part-way; whatever was saved before is left intact."""


@contextlib.contextmanager
def cli_spelling():
    """Within this block, messages spell options as command-line flags (``--name value``)."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def option(name: str, value: Any = None) -> str:
    """``name=value`` (Python) or ``--name value`` (CLI); a True flag is just ``--name`` on the CLI."""
    if _CLI.get():
        if value is True:
            return f"--{name}"
        return f"--{name}" if value is None else f"--{name} {value}"
    return name if value is None else f"{name}={value!r}"


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number in the given range."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{option(name)} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{option(name)} must be a finite number, got {value}")
    ok = True
    if low is not None:
        ok &= value > low if low_open else value >= low
    if high is not None:
        ok &= value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '≥'} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '≤'} {high:g}"
        rule = " and ".join(part for part in (lo, hi) if part)
        raise ConfigError(f"{option(name)} must be {rule}, got {value}")
