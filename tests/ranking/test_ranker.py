"""Ranker: one encode call across groups, duplicates embedded once, same results as per-group ranking."""
from __future__ import annotations

import numpy as np
import pytest

from selfrank.ranking.config import EmbedderConfig, RankingConfig
from selfrank.ranking.embed import LexicalEmbedder, SbertEmbedder, make_embedder
from selfrank.ranking.engine import rank_group
from selfrank.ranking.ranker import Ranker

GROUPS = [
    {"id": "a", "prompt": "Where is the bank?", "responses": [
        "It is two blocks away.", "The bank is two blocks from here.", "It is two blocks away.",
        "I like green apples.", "Two blocks down the road."]},
    {"id": "b", "prompt": "Any plans tonight?", "responses": [
        "I am going to the cinema.", "Maybe the cinema with friends.", "It is two blocks away.",
        "Staying home to watch a film."]},
    {"id": 7, "prompt": "Single", "responses": ["Only one answer here."]},
]


class CountingLexical(LexicalEmbedder):
    """The real lexical embedder, recording what it is asked to embed."""

    def __init__(self, dim):
        super().__init__(dim)
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return super().encode(texts)


class CountingSbert(SbertEmbedder):
    def __init__(self, config):
        super().__init__(config)
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return super().encode(texts)


def per_group(config, embedder, groups):
    return [rank_group(str(g["id"]), g["prompt"], g["responses"], embedder.encode(g["responses"]), config)
            for g in groups]


def test_one_encode_call_across_groups_with_duplicates_once():
    config = RankingConfig(embedder=EmbedderConfig(name="lexical", lexical_dim=1024))
    embedder = CountingLexical(1024)
    ranked = Ranker(config, embedder=embedder).rank(GROUPS)
    assert len(embedder.calls) == 1
    distinct = {t for g in GROUPS for t in g["responses"]}
    assert sorted(embedder.calls[0]) == sorted(distinct)  # each distinct text exactly once
    expected = per_group(config, LexicalEmbedder(1024), GROUPS)
    assert [r.to_json() for r in ranked] == [e.to_json() for e in expected]
    assert [r.id for r in ranked] == ["a", "b", "7"]


def test_batched_sbert_matches_per_group_ranking():
    config = RankingConfig()
    embedder = CountingSbert(config.embedder)
    ranker = Ranker(config, embedder=embedder)
    ranked = ranker.rank(GROUPS)
    assert len(embedder.calls) == 1
    expected = per_group(config, make_embedder(config.embedder), GROUPS)
    for got, want in zip(ranked, expected):
        assert got.order == want.order and got.clusters == want.clusters and got.pairs == want.pairs
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
    stats = ranker.stats
    assert stats["encode_calls"] == 1 and stats["groups"] == 3
    assert stats["texts"] == 10 and stats["unique_texts"] == 8
    assert stats["embed_s"] > 0 and stats["rank_s"] > 0


def test_clean_up_happens_before_embedding():
    config = RankingConfig(embedder=EmbedderConfig(name="lexical", lexical_dim=256), drop_incomplete_sentence=True)
    embedder = CountingLexical(256)
    ranked = Ranker(config, embedder=embedder).rank(
        [{"id": 1, "prompt": "p", "responses": ["It rains. Take an umb", "It rains."]}])
    assert ranked[0].responses == ["It rains.", "It rains."]
    assert embedder.calls == [["It rains."]]


@pytest.mark.parametrize("group, message", [
    ({"id": "x", "prompt": "p", "responses": ["ok", 3]}, r"group 'x': 'responses\[1\]' must be a string, got int"),
    ({"id": "x", "prompt": "p", "responses": "not a list"}, "'responses' must be a list of strings, got str"),
    ({"id": "x", "prompt": "p", "responses": []}, "'responses' is empty"),
    ({"id": "x", "responses": ["a"]}, "missing field 'prompt'"),
])
def test_malformed_group_is_named(group, message):
    embedder = CountingLexical(64)
    with pytest.raises((TypeError, ValueError), match=message):
        Ranker(RankingConfig(embedder=EmbedderConfig(name="lexical", lexical_dim=64)), embedder=embedder).rank(
            [GROUPS[0], group])
    assert embedder.calls == []  # nothing embedded for a batch that cannot be ranked
