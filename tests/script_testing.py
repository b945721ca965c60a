"""Helpers for the tests that run a script of scripts/ end to end on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_llama
from test_compare import byte_level_tokenizer

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name: str, *args, cwd, returncode: int = 0) -> str:
    """Run scripts/``name`` with ``args`` in ``cwd`` (one torch thread) and check that it exits with
    ``returncode``: its stdout when that is 0, else its stderr (the error a user would read)."""
    out = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=cwd, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == returncode, out.stderr[-3000:]
    return out.stdout if returncode == 0 else out.stderr


def save_tiny_chat_model(folder: Path) -> Path:
    """A tiny random Llama with a byte-level ChatML tokenizer, saved as a model folder."""
    tok = byte_level_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
