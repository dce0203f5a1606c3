"""(winner, loser) pairs from representatives ordered best first (the authors' sliding window)."""
from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def interval_length(n: int, interval: int | None, all_cross: bool = False) -> int:
    """IL: 1 for all cross-cluster pairs, else the configured value, else floor(n / 2); at least 1."""
    if all_cross:
        return 1
    if interval is not None:
        return max(1, int(interval))
    return max(1, n // 2)


def interval_pairs(ranked: Sequence[T], interval: int | None = None, all_cross: bool = False) -> list[tuple[T, T]]:
    """Pair ``ranked[i]`` (winner) with ``ranked[j]`` (loser) for every ``j >= i + IL``.

    ``ranked`` holds one representative per cluster, best first, so two answers of one cluster
    never meet. The gap of IL ranks keeps only pairs whose order TextRank is confident about.
    An IL of ``len(ranked)`` or more yields no pairs, as in the authors' window. Ordered by
    winner rank, then loser rank.
    """
    n = len(ranked)
    if n < 2:
        return []
    il = interval_length(n, interval, all_cross)
    return [(ranked[i], ranked[j]) for i in range(n) for j in range(i + il, n)]
