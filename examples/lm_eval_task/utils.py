"""Loads the example task's local JSONL file (next to this file): no network, no hub, no cache."""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data.jsonl"


def load_example(**kwargs):
    """lm-eval calls a task's ``custom_dataset`` with its metadata as keyword arguments (ignored here)."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
