"""Pairs over ranked representatives: the interval rule, checked property-style."""
from __future__ import annotations

import numpy as np

from selfrank.ranking.pairs import interval_length, interval_pairs


def test_interval_rule_holds_over_many_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 12))
        ranked = [int(x) for x in rng.permutation(100)[:n]]  # arbitrary ids, best first
        interval = None if rng.random() < 0.4 else int(rng.integers(1, 8))
        all_cross = bool(rng.random() < 0.2)
        pairs = interval_pairs(ranked, interval, all_cross)
        il = 1 if all_cross else (n // 2 if interval is None else interval)
        il = max(il, 1)
        pos = {r: i for i, r in enumerate(ranked)}
        expected = {(ranked[i], ranked[j]) for i in range(n) for j in range(n) if j - i >= il}
        assert set(pairs) == expected
        assert len(pairs) == len(expected)  # no duplicates
        for w, l in pairs:
            assert pos[l] - pos[w] >= il  # the winner is always the better-ranked one
        assert pairs == sorted(pairs, key=lambda p: (pos[p[0]], pos[p[1]]))


def test_authors_window_examples():
    assert interval_pairs(["a", "b", "c", "d"]) == [("a", "c"), ("a", "d"), ("b", "d")]  # IL = 2
    assert interval_pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]  # IL = floor(3/2) = 1
    assert interval_pairs(["a", "b"]) == [("a", "b")]
    assert interval_pairs(["a", "b", "c"], interval=2) == [("a", "c")]
    assert interval_pairs(["a", "b", "c"], interval=3) == []  # IL beyond the list: no pair
    assert interval_pairs(["a", "b", "c", "d"], interval=3, all_cross=True) == [
        ("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]


def test_fewer_than_two_representatives_give_no_pairs():
    assert interval_pairs([]) == []
    assert interval_pairs([7]) == []
    assert interval_pairs([7], all_cross=True) == []


def test_interval_length_is_at_least_one():
    assert interval_length(1, None) == 1
    assert interval_length(9, None) == 4
    assert interval_length(9, 3) == 3
    assert interval_length(9, 3, all_cross=True) == 1
