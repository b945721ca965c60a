"""Train / eval splits by prompt, never by row.

Several pairs can share one prompt (DSP has four per query; HH-RLHF repeats some). Splitting by
row would put the same prompt on both sides and leak it into the held-out set, so every pair of
one prompt goes to the same side.
"""

from __future__ import annotations

import json
import random

from datasets import Dataset


def _prompt_key(prompt) -> str:
    """A hashable key for a normalized prompt (a string or a list of messages)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def distinct_prompts(prompts) -> list:
    """The distinct prompts of ``prompts`` (strings or message lists), in first-seen order."""
    return list({_prompt_key(prompt): prompt for prompt in prompts}.values())


def split_by_prompt(dataset: Dataset, *, eval_size: int | float, seed: int = 0
                    ) -> tuple[Dataset, Dataset, dict]:
    """Split normalized pairs (see :func:`load_preference_pairs`) into train and eval by prompt.

    Args:
        dataset: normalized pairs with a ``prompt`` column.
        eval_size: a float in [0, 1) is the fraction of *pairs* to hold out; an int is the
            number of *pairs*. Whole prompt groups are moved to eval (in a seeded random order)
            until at least that many pairs are there, so the eval side can exceed the request
            by less than one group.
        seed: the shuffle seed; the same dataset and seed always give the same split.

    Returns:
        ``(train, eval, info)``; both keep the input's row order, and ``info`` records ``seed``,
        ``eval_size``, ``n_train_pairs``, ``n_eval_pairs``, ``n_train_prompts`` and
        ``n_eval_prompts`` (store it with every result).
    """
    n = len(dataset)
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)):
        raise TypeError(f"eval_size must be an int (pairs) or a float (fraction), got "
                        f"{eval_size!r}")
    if isinstance(eval_size, float):
        if not 0 <= eval_size < 1:
            raise ValueError(f"a fractional eval_size must be in [0, 1), got {eval_size}")
        target = round(eval_size * n)
    else:
        target = eval_size
    if not 0 <= target < n:
        raise ValueError(f"eval_size={eval_size!r} asks for {target} of {n} pairs; leave some "
                         "for training")

    groups: dict[str, list[int]] = {}  # first-appearance order keeps the split deterministic
    for i, prompt in enumerate(dataset["prompt"]):
        groups.setdefault(_prompt_key(prompt), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)

    eval_idx: list[int] = []
    n_eval_prompts = 0
    for group in order:
        if len(eval_idx) >= target:
            break
        eval_idx += group
        n_eval_prompts += 1
    if len(eval_idx) == n:
        raise ValueError(f"eval_size={eval_size!r} would hold out every prompt; lower it")
    held = set(eval_idx)
    train_idx = [i for i in range(n) if i not in held]
    info = {
        "seed": seed,
        "eval_size": eval_size,
        "n_train_pairs": len(train_idx),
        "n_eval_pairs": len(eval_idx),
        "n_train_prompts": len(groups) - n_eval_prompts,
        "n_eval_prompts": n_eval_prompts,
    }
    return dataset.select(train_idx), dataset.select(sorted(eval_idx)), info


def select_pairs(dataset: Dataset, n: int | None, *, seed: int = 0) -> Dataset:
    """A seeded random subset of ``n`` pairs in the input's order (all of them if ``n`` is None
    or not smaller than the dataset)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), n)))


def flip_labels(dataset: Dataset, fraction: float, *, seed: int = 0) -> tuple[Dataset, list[int]]:
    """Noisy preferences: swap chosen and rejected on a seeded ``round(fraction * len)`` of the pairs.

    Every column pair named ``chosen*`` / ``rejected*`` (texts and token ids alike) is swapped, so a
    tokenized dataset stays consistent. Returns the new dataset and the flipped row positions (sorted).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise must be a fraction in [0, 1], got {fraction}")
    n = round(fraction * len(dataset))
    flipped = sorted(random.Random(seed).sample(range(len(dataset)), n))
    if not flipped:
        return dataset, flipped
    chosen = [c for c in dataset.column_names if c.startswith("chosen")]
    pairs = [(c, "rejected" + c[len("chosen"):]) for c in chosen if "rejected" + c[len("chosen"):] in dataset.column_names]
    to_flip = set(flipped)

    def swap(row, i):
        flip = i in to_flip
        return {k: row[v if flip else k] for c, r in pairs for k, v in ((c, r), (r, c))}

    return dataset.map(swap, with_indices=True, load_from_cache_file=False, desc="flipping labels"), flipped
