"""How much generated answers repeat themselves: a degeneration check for the example answers."""

from __future__ import annotations

from typing import Sequence


def repeated_ngram_fraction(texts: Sequence[str], n: int = 4) -> float:
    """The fraction of word n-grams that already occurred earlier in the same text, pooled over
    ``texts`` (0 for text that never repeats a phrase; near 1 for a loop such as "I can help. I can
    help. ..."). Texts shorter than n words contribute nothing; with no n-gram at all it is 0."""
    repeated = total = 0
    for text in texts:
        words = text.split()
        seen: set[tuple[str, ...]] = set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            repeated += gram in seen
            total += 1
            seen.add(gram)
    return repeated / total if total else 0.0
