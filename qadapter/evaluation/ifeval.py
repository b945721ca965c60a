"""IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"): does the
policy still follow verifiable instructions ("answer in lowercase", "no commas", "at least 300
words")? Retention of what alignment put into a chat model, which multiple-choice benchmarks and a
teacher-forced KL do not see.

Each of the 541 prompts (shipped in ``data/ifeval``, Apache-2.0, see data/PROVENANCE.md) is one user
turn, rendered with the policy's chat template and answered greedily; the answer is scored by
lm-evaluation-harness's own IFEval checkers (``lm_eval.tasks.ifeval.utils.process_results``, the
functions the harness's ``ifeval`` task calls), never a rewrite of them. Four numbers, as the harness
reports them: prompt-level accuracy (every instruction of a prompt followed) and instruction-level
accuracy (the fraction of all instructions followed), each ``strict`` and ``loose`` (loose also
accepts the answer without its first / last line or without ``*``). Intervals: the shared bootstrap
over prompts; the instruction-level one resamples prompts too (instructions of one prompt are not
independent) and takes the ratio of the resampled sums.

The checkers split sentences with NLTK's ``punkt_tab``, which NLTK would download at run time. It
is read instead from the PyPI package ``llama-index-core``, whose wheel ships it (under
``llama_index/core/_static/nltk_cache``; located through the package metadata, none of its code is
imported). Without it :class:`MissingNLTKData` is raised before anything is generated, and a
lookup failing inside a checker raises it too: a missing resource never scores an instruction as
not followed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..chat import as_messages
from .benchmarks import DATA_DIR
from .scoring import generate_texts
from .stats import EvalResult, Metric, make_metric, ratio_metric, subsample

__all__ = ["MissingNLTKData", "NLTK_DATA_PACKAGE", "IFEVAL_MAX_NEW_TOKENS", "load_ifeval", "ensure_nltk_data",
           "score_ifeval", "evaluate_ifeval"]

#: the PyPI package whose wheel ships NLTK's punkt_tab (declared in the ``eval`` and ``test`` extras)
NLTK_DATA_PACKAGE = "llama-index-core"
_NLTK_CACHE = "llama_index/core/_static/nltk_cache"
_PUNKT = "tokenizers/punkt_tab/english/"
#: the answer length docs/evaluation.md measured as enough on SmolLM2-135M-Instruct: cutting the
#: answers at 256, 384 or 512 tokens changed no prompt's result (half the answers loop to any cap)
IFEVAL_MAX_NEW_TOKENS = 256
METRICS = ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc", "inst_level_loose_acc")


class MissingNLTKData(RuntimeError):
    """NLTK's punkt_tab, which the IFEval checkers need, is not installed."""


def nltk_data_dir() -> Path | None:
    """The NLTK data folder shipped by :data:`NLTK_DATA_PACKAGE`, or None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        folder = Path(str(distribution(NLTK_DATA_PACKAGE).locate_file(_NLTK_CACHE)))
    except PackageNotFoundError:
        return None
    return folder if folder.is_dir() else None


def _missing(detail: str) -> MissingNLTKData:
    return MissingNLTKData(f"the IFEval checkers need NLTK's punkt_tab ({detail}); install it with "
                           f"`pip install {NLTK_DATA_PACKAGE}` (its wheel ships the data; `pip install "
                           f"'qadapter[eval]'` does) or put punkt_tab on NLTK_DATA")


def ensure_nltk_data() -> None:
    """Put the shipped NLTK data on ``nltk.data.path`` and check that punkt_tab is found there (or
    anywhere NLTK looks); :class:`MissingNLTKData` otherwise. Call it before importing the checkers:
    their module tries to download punkt_tab on import when it is missing."""
    import nltk

    folder = nltk_data_dir()
    if folder is not None and str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))
    try:
        nltk.data.find(_PUNKT)
    except LookupError:
        raise _missing(f"not found in {NLTK_DATA_PACKAGE} nor on NLTK's path {nltk.data.path}") from None


def _checkers():
    """lm-evaluation-harness's IFEval scoring module (``process_results``), its data made available first."""
    ensure_nltk_data()
    from lm_eval.tasks.ifeval import utils

    return utils


def load_ifeval(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The IFEval prompts ``{"key", "prompt", "instruction_id_list", "kwargs"}`` of
    ``data_dir/ifeval/input_data.jsonl`` (default: the shipped copy), each row checked."""
    path = (Path(data_dir) if data_dir is not None else DATA_DIR) / "ifeval" / "input_data.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (pass data_dir= to a folder holding ifeval/input_data.jsonl)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e})") from None
            problem = _row_problem(row)
            if problem:
                raise ValueError(f"{path}, line {number}: {problem}")
            rows.append(row)
    return rows


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in ("key", "prompt", "instruction_id_list", "kwargs") if k not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        return "prompt must be a non-empty string"
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not isinstance(ids, list) or not ids or not isinstance(kwargs, list) or len(kwargs) != len(ids):
        return "instruction_id_list must be a non-empty list with one kwargs object per instruction"
    return None


def score_ifeval(docs: Sequence[dict], responses: Sequence[str]) -> list[dict[str, Any]]:
    """One record per (doc, response): lm-eval's ``process_results`` verdicts (prompt-level booleans,
    instruction-level lists, strict and loose) with the doc's key, instructions and the response.

    A checker that needs missing NLTK data raises :class:`MissingNLTKData`; any other checker error
    is raised naming the prompt's key (a verdict is never invented)."""
    if len(docs) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(docs)} IFEval prompts")
    utils = _checkers()
    records = []
    for doc, response in zip(docs, responses):
        try:
            verdict = utils.process_results(doc, [response])
        except LookupError as e:
            raise _missing(f"a checker of prompt {doc['key']} failed: {str(e).strip().splitlines()[0]}") from e
        except Exception as e:
            raise RuntimeError(f"the IFEval checkers failed on prompt {doc['key']} "
                               f"({doc['instruction_id_list']}): {e}") from e
        records.append({"key": doc["key"], "instruction_id_list": list(doc["instruction_id_list"]),
                        "response": response, **{k: verdict[k] for k in METRICS}})
    return records


def ifeval_metrics(records: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, Metric]:
    """The four IFEval accuracies of scored records (:func:`score_ifeval`), each with its interval."""
    counts = np.asarray([len(r["inst_level_strict_acc"]) for r in records], dtype=np.float64)
    out = {}
    for level in ("strict", "loose"):
        out[f"prompt_level_{level}_acc"] = make_metric([float(r[f"prompt_level_{level}_acc"]) for r in records],
                                                       n_boot, seed)
        followed = np.asarray([sum(r[f"inst_level_{level}_acc"]) for r in records], dtype=np.float64)
        out[f"inst_level_{level}_acc"] = ratio_metric(followed, counts, n_boot, seed)
    return out


def evaluate_ifeval(policy, *, limit: int | None = None, seed: int = 0, max_new_tokens: int = IFEVAL_MAX_NEW_TOKENS,
                    batch_size: int = 8, data_dir=None, progress: bool = True, n_boot: int = 1000) -> EvalResult:
    """IFEval of ``policy`` (the module docstring): ``limit`` prompts drawn (seeded) from the 541,
    each a user turn answered greedily in at most ``max_new_tokens`` tokens, scored by lm-eval's
    checkers. Primary: ``prompt_level_strict_acc``. The checkers' data is checked before generating."""
    ensure_nltk_data()
    docs = subsample(load_ifeval(data_dir), limit, seed)
    responses = generate_texts(policy, [as_messages(d["prompt"]) for d in docs], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=progress, desc="ifeval answers")
    records = score_ifeval(docs, responses)
    result = EvalResult("ifeval", len(records), ifeval_metrics(records, n_boot, seed), "prompt_level_strict_acc",
                        {"limit": limit, "seed": seed, "max_new_tokens": max_new_tokens, "chat": True,
                         "checkers": "lm_eval.tasks.ifeval.utils.process_results"},
                        samples=[{"index": i, **r} for i, r in enumerate(records)])
    result.extra.update(n_instructions=int(sum(len(r["inst_level_strict_acc"]) for r in records)))
    return result
