"""Saving without half-written files, and reading back what was saved.

:func:`save_atomically` writes a whole folder (a model, an adapter, a stack) into a temporary
sibling that then replaces the target; :func:`write_text_atomically`, :func:`write_json`,
:func:`write_jsonl` and :func:`save_figure` do the same for one file. A crash or a full disk leaves the previous version intact, never a mixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Sequence

from .errors import SaveError


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Run ``write(fh)`` on a temporary binary file in ``path``'s folder, then rename it to ``path``
    (a crash leaves the previous file, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomically(path, lambda fh: fh.write(text.encode("utf-8")))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """One JSON value per line (non-ASCII kept as is), atomically."""
    return write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically, in the format ``path``'s suffix names (PNG without one)."""
    path = Path(path)
    return write_atomically(path, lambda fh: fig.savefig(fh, format=path.suffix[1:] or "png", dpi=dpi))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> Path:
    """``obj`` as JSON (non-JSON values as their ``str``), atomically."""
    return write_text_atomically(path, json.dumps(obj, indent=indent, default=str, ensure_ascii=False))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sha256_files(paths: Sequence[str | os.PathLike]) -> str:
    """One short digest of the names and contents of ``paths`` (in sorted order)."""
    digest = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        digest.update(p.name.encode())
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def save_atomically(output_dir: str | os.PathLike, write, *, manifest: bool = True) -> Path:
    """Run ``write(folder)`` into a temporary sibling folder that then replaces ``output_dir``, so
    a crash never leaves a half-written model behind (and an old one survives a failed save).

    ``manifest``: also record every file's size and SHA-256 (``qadapter_checksums.json``), so that a
    later load detects a truncated or corrupted file. A write that fails (no space left, no
    permission) raises :class:`~qadapter.errors.SaveError` saying so; the previous folder is intact.
    """
    from .integrity import write_manifest  # integrity imports nothing of qadapter's but errors

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write(tmp)
        if manifest:
            write_manifest(tmp)
        if output_dir.exists():
            old = output_dir.with_name(output_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            output_dir.rename(old)
            try:
                tmp.rename(output_dir)
            except BaseException:
                old.rename(output_dir)  # put the previous one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = (f"the previous {output_dir} is intact" if output_dir.exists()
                else f"nothing was written to {output_dir}")
        what = f" ({os.strerror(e.errno)})" if e.errno and not e.strerror else ""
        raise SaveError(e.errno, f"could not save {output_dir}: {e.strerror or e}{what}"
                        f"{f' while writing {Path(e.filename).name}' if e.filename else ''}; {kept}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir
