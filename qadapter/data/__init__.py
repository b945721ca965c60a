"""Preference data: load and validate pairs, split them by prompt, tokenize them.

Typical use::

    pairs, report = load_preference_pairs("pairs.jsonl")       # or load_embedded_pairs()
    train, held_out, split_info = split_by_prompt(pairs, eval_size=0.1, seed=0)
    train_ids, tok_report = tokenize_pairs(train, tokenizer, max_length=512)
"""

from .formats import (
    EMBEDDED_PAIRS_PATH,
    LoadReport,
    PreferenceDataError,
    load_embedded_pairs,
    load_preference_pairs,
)
from .split import distinct_prompts, flip_labels, select_pairs, split_by_prompt
from .tokenization import TokenizeReport, tokenize_pair, tokenize_pairs

__all__ = [
    "EMBEDDED_PAIRS_PATH",
    "LoadReport",
    "PreferenceDataError",
    "TokenizeReport",
    "distinct_prompts",
    "flip_labels",
    "load_embedded_pairs",
    "load_preference_pairs",
    "select_pairs",
    "split_by_prompt",
    "tokenize_pair",
    "tokenize_pairs",
]
