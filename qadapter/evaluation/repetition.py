"""How much generated answers repeat themselves: a degeneration check for the example answers."""

from __future__ import annotations

from typing import Sequence


def _counts(text: str, n: int) -> tuple[int, int]:
    """(word n-grams already seen earlier in ``text``, all its word n-grams)."""
    words = text.split()
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        repeated += gram in seen
        seen.add(gram)
    return repeated, max(len(words) - n + 1, 0)


def repeated_ngram_fraction(texts: Sequence[str], n: int = 4) -> float:
    """The fraction of word n-grams that already occurred earlier in the same text, pooled over
    ``texts`` (0 for text that never repeats a phrase; near 1 for a loop such as "I can help. I can
    help. ..."). Texts shorter than n words contribute nothing; with no n-gram at all it is 0."""
    counts = [_counts(text, n) for text in texts]
    total = sum(t for _, t in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def repeated_ngram_fractions(texts: Sequence[str], n: int = 4) -> list[float]:
    """Per text, the fraction of its word n-grams seen earlier in it (0 for a text shorter than n
    words): the per-item scores whose mean and bootstrap interval an evaluation reports."""
    return [r / t if t else 0.0 for r, t in (_counts(text, n) for text in texts)]
