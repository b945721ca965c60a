"""Loaders for the benchmark files shipped in ``qadapter/evaluation/data`` (see its PROVENANCE.md).

Every loader takes ``data_dir``: a folder laid out like the shipped one (and like the project's
``shared/data`` mirror): ``mmlu/{test,dev}/{subject}_{split}.csv``, ``arc/arc_{easy,challenge}.test.jsonl``,
``gsm8k/{test,train}.jsonl``, ``bbh/bbh/{task}.json`` + ``bbh/cot-prompts/{task}.txt``, and
``ultrafeedback_prompts/prompts.jsonl`` (or ``ultrafeedback_binarized_subset/train.jsonl``, whose
first user turns are used). ``None`` means the shipped copy.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["DATA_DIR", "MCItem", "load_mmlu", "mmlu_subjects", "load_arc", "load_gsm8k", "load_bbh",
           "load_bbh_cot_prompt", "bbh_tasks", "load_general_prompts"]

#: the benchmark files shipped with the package
DATA_DIR = Path(__file__).resolve().parent / "data"


def _root(data_dir: str | os.PathLike | None) -> Path:
    root = Path(data_dir) if data_dir is not None else DATA_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} is not a folder")
    return root


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (pass data_dir= to point at your own copy)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class MCItem:
    """A multiple-choice item: ``context`` followed by one of ``continuations``; ``gold`` is the index
    of the right one. ``choices`` are the raw answer texts (their lengths drive acc_norm)."""

    context: str
    continuations: list[str]
    gold: int
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- MMLU
MMLU_LETTERS = ("A", "B", "C", "D")


def mmlu_subjects(data_dir=None) -> list[str]:
    folder = _root(data_dir) / "mmlu" / "test"
    return sorted(p.name[: -len("_test.csv")] for p in folder.glob("*_test.csv"))


def _mmlu_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return [row for row in csv.reader(f) if row]


def _mmlu_block(row: Sequence[str], with_answer: bool) -> str:
    question, *options, answer = row
    text = question.strip() + "\n" + "".join(f"{l}. {o}\n" for l, o in zip(MMLU_LETTERS, options)) + "Answer:"
    return text + (f" {answer.strip()}\n\n" if with_answer else "")


def load_mmlu(n_shot: int = 0, subjects: Sequence[str] | None = None, data_dir=None, split: str = "test") -> list[MCItem]:
    """MMLU in lm-evaluation-harness's ``mmlu`` format.

    Each context is ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``,
    then ``n_shot`` (0..5) exemplars from the subject's dev split (in file order, each ending with
    ``"Answer: X\\n\\n"``), then ``"{question}\\nA. ...\\nD. ...\\nAnswer:"``; the continuations are
    ``" A"`` .. ``" D"``.
    """
    root = _root(data_dir)
    subjects = list(subjects) if subjects else mmlu_subjects(root)
    if not 0 <= n_shot <= 5:
        raise ValueError(f"MMLU has 5 dev exemplars per subject; n_shot must be 0..5, got {n_shot}")
    items: list[MCItem] = []
    for subject in subjects:
        path = root / "mmlu" / split / f"{subject}_{split}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"no MMLU subject {subject!r} at {path}")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = ""
        if n_shot:
            dev = _mmlu_rows(root / "mmlu" / "dev" / f"{subject}_dev.csv")[:n_shot]
            shots = "".join(_mmlu_block(r, True) for r in dev)
        for i, row in enumerate(_mmlu_rows(path)):
            answer = row[-1].strip()
            items.append(MCItem(header + shots + _mmlu_block(row, False), [f" {l}" for l in MMLU_LETTERS],
                                MMLU_LETTERS.index(answer), {"subject": subject, "index": i}))
    return items


# --------------------------------------------------------------------------- ARC
def load_arc(subset: str = "easy", data_dir=None) -> list[MCItem]:
    """ARC-Easy / ARC-Challenge test in MosaicML's format: context ``"{query}\\nAnswer:"`` (the query
    starts with ``"Question: "``), continuations ``" {choice}"`` — the same prompt as lm-eval's arc tasks."""
    subset = subset.lower().replace("arc_", "").replace("arc-", "")
    if subset not in ("easy", "challenge"):
        raise ValueError(f"subset must be 'easy' or 'challenge', got {subset!r}")
    rows = _jsonl(_root(data_dir) / "arc" / f"arc_{subset}.test.jsonl")
    return [MCItem(f"{r['query']}\nAnswer:", [f" {c}" for c in r["choices"]], int(r["gold"]), {"index": i})
            for i, r in enumerate(rows)]


# --------------------------------------------------------------------------- GSM8K
def load_gsm8k(split: str = "test", data_dir=None) -> list[dict[str, str]]:
    """GSM8K rows ``{"question", "answer"}`` (the answer ends with ``#### <number>``). The shipped
    copy holds the full test split and only the first 64 train rows (``train_fewshot.jsonl``), which
    is all the few-shot prompt uses; a ``data_dir`` with a full ``train.jsonl`` is read in full."""
    folder = _root(data_dir) / "gsm8k"
    path = folder / f"{split}.jsonl"
    if split == "train" and not path.is_file():
        path = folder / "train_fewshot.jsonl"
    return _jsonl(path)


# --------------------------------------------------------------------------- BBH
def bbh_tasks(data_dir=None) -> list[str]:
    return sorted(p.stem for p in (_root(data_dir) / "bbh" / "bbh").glob("*.json"))


def load_bbh(task: str, data_dir=None) -> list[dict[str, str]]:
    """The examples ``{"input", "target"}`` of one BIG-Bench Hard task."""
    path = _root(data_dir) / "bbh" / "bbh" / f"{task}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no BBH task {task!r} at {path}")
    return json.loads(path.read_text(encoding="utf-8"))["examples"]


def load_bbh_cot_prompt(task: str, data_dir=None) -> str:
    """The task's 3-shot chain-of-thought prompt (task description + 3 worked exemplars), without
    the canary header of the file."""
    text = (_root(data_dir) / "bbh" / "cot-prompts" / f"{task}.txt").read_text(encoding="utf-8")
    if "-----\n" in text:
        text = text.split("-----\n", 1)[1]
    return text.strip("\n")


# --------------------------------------------------------------------------- general prompts
def load_general_prompts(data_dir=None, exclude: Iterable[str] = ()) -> list[str]:
    """General user prompts (single turn) for the KL, fluency and win-rate evaluations: the prompts
    of the UltraFeedback subset (the answers are not shipped). ``exclude``: user turns to leave out
    (compared with surrounding whitespace stripped), e.g. every prompt a policy trained on, so that a
    retention measure never asks what the training answered (training on UltraFeedback itself)."""
    root = _root(data_dir)
    path = root / "ultrafeedback_prompts" / "prompts.jsonl"
    if path.is_file():
        prompts = [r["prompt"] for r in _jsonl(path)]
    else:
        prompts = [r["chosen"][0]["content"] for r in _jsonl(root / "ultrafeedback_binarized_subset" / "train.jsonl")]
    excluded = {text.strip() for text in exclude}
    return [p for p in prompts if p.strip() not in excluded] if excluded else prompts


