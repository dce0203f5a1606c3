"""TextRank against an independent numpy PageRank, plus its ranking properties."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from selfrank.ranking.config import TextRankConfig
from selfrank.ranking.textrank import pagerank, rank_order, similarity_matrix, textrank_scores


def oracle_pagerank(w: np.ndarray, d: float = 0.85, iters: int = 100_000, tol: float = 1e-15) -> np.ndarray:
    """Textbook weighted PageRank: p = (1-d)/n + d * sum_j p_j * w_ji / out_j; a node without
    out-weight spreads its score uniformly."""
    n = w.shape[0]
    out = w.sum(1)
    p = np.full(n, 1.0 / n)
    for _ in range(iters):
        new = np.full(n, (1 - d) / n)
        for j in range(n):
            if out[j] > 0:
                new += d * p[j] * w[j] / out[j]
            else:
                new += d * p[j] / n
        done = np.abs(new - p).sum() < tol
        p = new
        if done:
            break
    return p / p.sum()


def oracle_weights(emb: np.ndarray, mapping: str) -> np.ndarray:
    n = emb.shape[0]
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            a, b = emb[i], emb[j]
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
            w[i, j] = 0.5 + 0.5 * cos if mapping == "affine" else max(cos, 0.0)
    return w


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(6))
def test_pagerank_matches_oracle_on_random_graphs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    w = rng.random((n, n))
    w = np.triu(w, 1)
    w[rng.random((n, n)) < 0.3] = 0.0  # sparse edges, sometimes isolated (dangling) nodes
    w = w + w.T
    got = pagerank(w, damping=0.85, max_iter=1000, tol=1e-12)
    want = oracle_pagerank(w)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(got, want, atol=1e-9)


@pytest.mark.parametrize("mapping", ["affine", "clipped"])
@pytest.mark.parametrize("seed", range(3))
def test_textrank_matches_oracle_for_both_mappings(mapping, seed):
    rng = np.random.default_rng(100 + seed)
    emb = unit(rng.normal(size=(7, 5)))
    w = oracle_weights(emb, mapping)
    np.testing.assert_allclose(similarity_matrix(emb, mapping), w, atol=1e-12)
    got = textrank_scores(emb.astype(np.float32), TextRankConfig(similarity=mapping, tol=1e-12))
    np.testing.assert_allclose(got, oracle_pagerank(w), atol=1e-7)


def test_mappings_differ_and_clipped_drops_negative_similarity():
    emb = np.array([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])
    aff, clip = similarity_matrix(emb, "affine"), similarity_matrix(emb, "clipped")
    assert aff[0, 1] == pytest.approx(0.0) and aff[0, 2] == pytest.approx(0.8)
    assert clip[0, 1] == 0.0 and clip[0, 2] == pytest.approx(0.6)
    assert np.all(np.diag(aff) == 0) and np.all(np.diag(clip) == 0)
    assert np.array_equal(aff, aff.T) and np.array_equal(clip, clip.T)


def test_permutation_equivariance():
    rng = np.random.default_rng(7)
    emb = unit(rng.normal(size=(9, 6)))
    perm = rng.permutation(9)
    for mapping in ("affine", "clipped"):
        cfg = TextRankConfig(similarity=mapping)
        base, permuted = textrank_scores(emb, cfg), textrank_scores(emb[perm], cfg)
        np.testing.assert_allclose(permuted, base[perm], atol=1e-10)


@pytest.mark.parametrize("mapping", ["affine", "clipped"])
def test_duplicated_central_answer_rises(mapping):
    rng = np.random.default_rng(3)
    centre = unit(rng.normal(size=(1, 8)))
    emb = unit(centre + 0.35 * rng.normal(size=(8, 8)))
    cfg = TextRankConfig(similarity=mapping)
    base = textrank_scores(emb, cfg)
    target = rank_order(base)[3]  # a middle-ranked answer
    dup = np.vstack([emb, emb[target]])
    after = textrank_scores(dup, cfg)
    assert rank_order(after).index(target) < rank_order(base).index(target)
    assert after[target] == pytest.approx(after[-1], abs=1e-12)  # the two copies tie


@pytest.mark.parametrize("mapping", ["affine", "clipped"])
def test_outlier_ranks_last(mapping):
    rng = np.random.default_rng(4)
    centre = unit(rng.normal(size=(1, 10)))
    emb = unit(centre + 0.2 * rng.normal(size=(6, 10)))
    emb = np.vstack([emb[:2], unit(-centre + 0.2 * rng.normal(size=(1, 10))), emb[2:]])
    order = rank_order(textrank_scores(emb, TextRankConfig(similarity=mapping)))
    assert order[-1] == 2


def test_degenerate_groups_are_defined():
    cfg = TextRankConfig()
    assert textrank_scores(np.zeros((0, 4)), cfg).shape == (0,)
    np.testing.assert_allclose(textrank_scores(unit(np.ones((1, 4))), cfg), [1.0])
    same = np.tile(unit(np.array([[1.0, 2.0, 3.0]])), (5, 1))
    for mapping in ("affine", "clipped"):
        np.testing.assert_allclose(textrank_scores(same, TextRankConfig(similarity=mapping)), np.full(5, 0.2))
        zeros = textrank_scores(np.zeros((4, 3)), TextRankConfig(similarity=mapping))  # empty answers
        np.testing.assert_allclose(zeros, np.full(4, 0.25))
    # Orthogonal answers under "clipped": no edge at all -> uniform, never NaN.
    np.testing.assert_allclose(textrank_scores(np.eye(3), TextRankConfig(similarity="clipped")), np.full(3, 1 / 3))
    # A zero vector among real ones: finite, sums to 1, and ranks below the similar ones.
    mixed = np.vstack([unit(np.array([[1.0, 0.1], [1.0, 0.0], [0.9, 0.2]])), np.zeros((1, 2))])
    s = textrank_scores(mixed, cfg)
    assert np.all(np.isfinite(s)) and s.sum() == pytest.approx(1.0)
    assert rank_order(s)[-1] == 3
    # Weights with NaN / negative entries are treated as no edge.
    w = np.array([[0, np.nan, -1.0], [np.nan, 0, 1.0], [-1.0, 1.0, 0]])
    s = pagerank(w)
    assert np.all(np.isfinite(s)) and s.sum() == pytest.approx(1.0)


def test_non_convergence_falls_back_to_last_iterate(caplog):
    rng = np.random.default_rng(5)
    w = rng.random((6, 6))
    w = np.triu(w, 1) + np.triu(w, 1).T
    with caplog.at_level(logging.WARNING, logger="selfrank.ranking.textrank"):
        got = pagerank(w, damping=0.85, max_iter=2, tol=1e-15)
    assert "did not converge" in caplog.text
    want = oracle_pagerank(w, iters=2, tol=0.0)
    np.testing.assert_allclose(got, want, atol=1e-12)
    # Also with an isolated (dangling) node, whose score mass must be spread uniformly.
    w[:, 2] = 0.0
    w[2, :] = 0.0
    with caplog.at_level(logging.WARNING, logger="selfrank.ranking.textrank"):
        got = pagerank(w, damping=0.85, max_iter=3, tol=1e-15)
    np.testing.assert_allclose(got, oracle_pagerank(w, iters=3, tol=0.0), atol=1e-12)


def test_rank_order_breaks_ties_by_lower_index():
    assert rank_order([0.2, 0.5, 0.2, 0.1]) == [1, 0, 2, 3]
    assert rank_order([0.25, 0.25 + 1e-16, 0.25, 0.25 - 1e-17]) == [0, 1, 2, 3]
    assert rank_order([0.1, 0.3, 0.6]) == [2, 1, 0]
    assert rank_order([]) == []
