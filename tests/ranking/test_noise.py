"""Perturbations of a pair's loser: each kind, seeding, and the no-op fallback."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from selfrank.ranking.config import NoiseConfig
from selfrank.ranking.noise import KINDS, apply_kind, perturb

TEXT = "The river is wide. Boats never cross it at night. People can swim in summer."


def rng(seed=0):
    return np.random.default_rng(seed)


def only(kind: str) -> NoiseConfig:
    """A config whose weights select one category."""
    weights = {"ngram_weight": 0.0, "negation_weight": 0.0, "shuffle_weight": 0.0}
    weights[{"negation": "negation_weight", "shuffle": "shuffle_weight"}.get(kind, "ngram_weight")] = 1.0
    return NoiseConfig(enabled=True, **weights)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_changes_the_words(kind):
    for seed in range(20):
        out = apply_kind(kind, TEXT, rng(seed))
        assert out is not None
        new, detail = out
        assert new.split() != TEXT.split() and new.strip()
        assert isinstance(detail, dict)


def test_ngram_edits_use_n_below_4():
    words = TEXT.split()
    for seed in range(30):
        new, d = apply_kind("ngram_delete", TEXT, rng(seed))
        assert 1 <= d["n"] <= 3 and len(new.split()) == len(words) - d["n"]
        assert words[d["position"]:d["position"] + d["n"]] == d["removed"].split()
        new, d = apply_kind("ngram_insert", TEXT, rng(seed))
        assert 1 <= d["n"] <= 3 and len(new.split()) == len(words) + d["n"]
        assert d["inserted"] in TEXT  # a duplicated n-gram of the text itself
        new, d = apply_kind("ngram_replace", TEXT, rng(seed))
        assert 1 <= d["n"] <= 3 and len(new.split()) == len(words)
        if d["source"] == "copy":
            assert d["new"] in TEXT and d["new"] != d["old"]
        else:
            assert sorted(d["new"].split()) == sorted(d["old"].split()) and d["new"] != d["old"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The sky is blue", "The sky is not blue"),
        ("I don't know", "I do know"),
        ("Cats never bark", "Cats always bark"),
        ("Cats always bark", "Cats never bark"),
        ("You can go", "You cannot go"),
        ("You can't go", "You can go"),
        ("It isn\u2019t here", "It is here"),
        ("It is not here", "It is here"),
        ("Yes", "No"),
    ],
)
def test_negation_flips_the_single_hook(text, expected):
    new, detail = apply_kind("negation", text, rng(0))
    assert new == expected
    assert detail["hook"] is not None


def test_negation_without_hook_prepends_a_negator():
    seen = set()
    for seed in range(20):
        new, detail = apply_kind("negation", "Paris, France.", rng(seed))
        assert new in ("No, Paris, France.", "Not Paris, France.")
        assert detail["hook"] is None
        seen.add(new)
    assert len(seen) == 2


def test_shuffle_permutes_sentences_or_swaps_words():
    new, d = apply_kind("shuffle", TEXT, rng(1))
    assert d["unit"] == "sentence"
    sentences = ["The river is wide.", "Boats never cross it at night.", "People can swim in summer."]
    assert sorted(re.split(r"(?<=\.)\s+", new)) == sorted(sentences) and new != TEXT
    single = "the quick brown fox jumps"
    new, d = apply_kind("shuffle", single, rng(1))
    assert d["unit"] == "word" and sorted(new.split()) == sorted(single.split()) and new != single
    assert apply_kind("shuffle", "same same same", rng(0)) is None
    # Two identical sentences cannot be reordered: fall back to swapping words.
    new, d = apply_kind("shuffle", "Go now. Go now.", rng(0))
    assert d["unit"] == "word"


def test_perturb_records_kind_and_text_and_follows_weights():
    for kind in ("negation", "shuffle"):
        for seed in range(10):
            new, record = perturb(TEXT, rng(seed), only(kind))
            assert record["kind"] == kind and record["text"] == new and new != TEXT
    kinds = Counter(perturb(TEXT, rng(s), only("ngram"))[1]["kind"] for s in range(60))
    assert set(kinds) == {"ngram_delete", "ngram_replace", "ngram_insert"}
    mixed = Counter(perturb(TEXT, rng(s), NoiseConfig(enabled=True))[1]["kind"] for s in range(200))
    assert set(mixed) == set(KINDS)


def test_no_op_kind_falls_back_to_another():
    # "Paris" cannot be shuffled or shortened; with shuffle weighted heavily, another kind must apply.
    cfg = NoiseConfig(enabled=True, ngram_weight=1.0, negation_weight=0.0, shuffle_weight=100.0)
    for seed in range(10):
        new, record = perturb("Paris", rng(seed), cfg)
        assert record is not None and record["kind"] in ("ngram_insert", "ngram_delete", "ngram_replace")
        assert new.split() != ["Paris"]
    # Nothing can change an empty text.
    assert perturb("", rng(0), NoiseConfig(enabled=True)) == ("", None)
    assert perturb("   ", rng(0), NoiseConfig(enabled=True)) == ("   ", None)


def test_perturb_is_reproducible_and_seed_dependent():
    cfg = NoiseConfig(enabled=True)
    a = [perturb(TEXT, rng(s), cfg) for s in range(15)]
    b = [perturb(TEXT, rng(s), cfg) for s in range(15)]
    assert a == b
    assert len({out for out, _ in a}) > 5
