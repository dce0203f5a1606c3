"""TextRank centrality of answers: weighted PageRank over their complete similarity graph.

An answer that many other samples resemble sits in the dense middle of the model's output
distribution and gets a high score; an outlier gets a low one. Scores sum to 1 and are always
finite: degenerate groups (one answer, identical answers, zero vectors, no edge at all) get
defined, usually uniform, scores.
"""
from __future__ import annotations

import logging

import networkx as nx
import numpy as np

from selfrank.ranking.config import TextRankConfig

log = logging.getLogger(__name__)

# Scores closer than this count as tied, so that float noise between identical answers cannot
# reorder them: ties go to the lower index.
TIE_DECIMALS = 12


def _unit_rows(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero (their cosine to anything is 0)."""
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array, got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 0)


def similarity_matrix(emb: np.ndarray, mapping: str = "affine") -> np.ndarray:
    """Edge weights ``(n, n)`` from cosine similarity; symmetric, non-negative, zero diagonal.

    ``affine``: 0.5 + 0.5 * cos (the authors' demo; every pair keeps a positive edge).
    ``clipped``: max(cos, 0) (dissimilar answers are simply not linked).
    Self-loops are excluded: an answer must not vote for itself.
    """
    unit = _unit_rows(emb)
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    cos = 0.5 * (cos + cos.T)  # exact symmetry despite float rounding
    if mapping == "affine":
        weights = 0.5 + 0.5 * cos
    elif mapping == "clipped":
        weights = np.maximum(cos, 0.0)
    else:
        raise ValueError(f"unknown similarity mapping {mapping!r} (affine or clipped)")
    np.fill_diagonal(weights, 0.0)
    return weights


def _power_iteration(weights: np.ndarray, damping: float, max_iter: int, tol: float) -> np.ndarray:
    """Standard weighted PageRank (out-weight normalised, dangling mass spread uniformly).

    Used when networkx does not converge: returns the last iterate instead of failing.
    """
    n = weights.shape[0]
    out = weights.sum(axis=1)
    dangling = out <= 0
    trans = np.divide(weights, out[:, None], out=np.zeros_like(weights), where=~dangling[:, None])
    x = np.full(n, 1.0 / n)
    for _ in range(max_iter):
        prev = x
        x = damping * (trans.T @ prev + prev[dangling].sum() / n) + (1.0 - damping) / n
        x /= x.sum()
        if np.abs(x - prev).sum() < tol:
            break
    return x


def pagerank(weights: np.ndarray, damping: float = 0.85, max_iter: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """Weighted PageRank scores (sum 1) of the undirected graph with adjacency ``weights``.

    Runs ``networkx.pagerank``; ``tol`` is the L1 change of the score vector at which the power
    iteration stops (networkx's own ``tol`` is per node, hence the division by n). Non-positive
    weights are no edge. Never NaN: an empty graph or a graph without edges gets uniform scores.
    """
    weights = np.asarray(weights, dtype=np.float64)
    n = weights.shape[0]
    if weights.shape != (n, n):
        raise ValueError(f"weights must be square, got shape {weights.shape}")
    if n == 0:
        return np.zeros(0)
    weights = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
    np.fill_diagonal(weights, 0.0)
    if n == 1 or not weights.any():
        return np.full(n, 1.0 / n)

    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    rows, cols = np.nonzero(np.triu(weights, k=1))
    graph.add_weighted_edges_from(
        (int(i), int(j), float(max(weights[i, j], weights[j, i]))) for i, j in zip(rows, cols)
    )
    try:
        result = nx.pagerank(graph, alpha=damping, max_iter=max_iter, tol=tol / n, weight="weight")
        scores = np.array([result[i] for i in range(n)], dtype=np.float64)
    except nx.PowerIterationFailedConvergence:
        log.warning("PageRank did not converge in %d iterations; using the last iterate", max_iter)
        sym = np.maximum(weights, weights.T)
        scores = _power_iteration(sym, damping, max_iter, tol)
    if not np.all(np.isfinite(scores)) or scores.sum() <= 0:
        return np.full(n, 1.0 / n)
    return scores / scores.sum()


def textrank_scores(emb: np.ndarray, config: TextRankConfig) -> np.ndarray:
    """TextRank score per answer (sum 1) from its embedding rows."""
    weights = similarity_matrix(emb, config.similarity)
    return pagerank(weights, config.damping, config.max_iter, config.tol)


def rank_order(scores) -> list[int]:
    """Indices sorted by score, highest first; (near-)ties go to the lower index."""
    rounded = np.round(np.asarray(scores, dtype=np.float64), TIE_DECIMALS)
    n = rounded.shape[0]
    return [int(i) for i in np.lexsort((np.arange(n), -rounded))]
