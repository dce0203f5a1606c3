"""ISODATA clustering of one prompt's answer embeddings, and a medoid per cluster.

ISODATA is k-means whose number of clusters adapts: too-small clusters are dissolved, too-spread
ones split, too-close ones merged. STR uses it to find groups of near-paraphrases and keep one
answer of each, so that pairs never contrast two versions of the same answer.

Definitions used throughout (see ``IsodataConfig``):
- spread of a cluster = mean squared Euclidean distance of its members to its centroid (the trace
  of its covariance). For unit vectors this is 1 - |centroid|^2 = 1 - mean pairwise cosine.
- identical points are clustered as one weighted point, so they can never be separated.
"""
from __future__ import annotations

import numpy as np

from selfrank.ranking.config import IsodataConfig


def _sq_dists(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = (points**2).sum(1)[:, None] - 2.0 * points @ centroids.T + (centroids**2).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _centroids(points: np.ndarray, weights: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    sums = np.zeros((k, points.shape[1]))
    np.add.at(sums, labels, points * weights[:, None])
    mass = np.bincount(labels, weights=weights, minlength=k)
    return sums / mass[:, None]


def _spread(points: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean squared distance to the weighted centroid."""
    centre = (points * weights[:, None]).sum(0) / weights.sum()
    return float((weights * ((points - centre) ** 2).sum(1)).sum() / weights.sum())


def _init_centroids(points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding over distinct points (duplicates count by their weight)."""
    m = points.shape[0]
    first = int(rng.choice(m, p=weights / weights.sum()))
    chosen = [first]
    best = _sq_dists(points, points[[first]])[:, 0]
    while len(chosen) < k:
        mass = best * weights
        if mass.sum() <= 0:
            break
        nxt = int(rng.choice(m, p=mass / mass.sum()))
        chosen.append(nxt)
        best = np.minimum(best, _sq_dists(points, points[[nxt]])[:, 0])
    return points[chosen].copy()


def _assign(
    points: np.ndarray, weights: np.ndarray, centroids: np.ndarray, min_size: float
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-centroid labels (ties -> lower cluster), then dissolve empty and too-small clusters.

    Points of a dissolved cluster go to the nearest surviving centroid. If every cluster is too
    small, the largest one survives (a group smaller than the minimum stays one cluster).
    Returns compacted labels and the surviving clusters' recomputed centroids.
    """
    labels = np.argmin(_sq_dists(points, centroids), axis=1)
    k = centroids.shape[0]
    mass = np.bincount(labels, weights=weights, minlength=k)
    keep = mass >= min_size
    if not keep.any():
        keep = np.zeros(k, dtype=bool)
        keep[int(np.argmax(mass))] = True
    if not keep.all():
        kept = centroids[keep]
        labels = np.argmin(_sq_dists(points, kept), axis=1)
        k = kept.shape[0]
    # Drop clusters left empty and renumber densely.
    used = np.unique(labels)
    remap = np.full(k, -1)
    remap[used] = np.arange(used.size)
    labels = remap[labels]
    return labels, _centroids(points, weights, labels, used.size)


def _try_split(points, weights, members, config: IsodataConfig):
    """Split one cluster in two along its principal axis, or return None.

    Members are divided by the sign of their projection on the first principal component
    (the direction of largest variance). The split is refused when a half would be smaller
    than ``min_cluster_size`` or when its two centroids would be closer than ``merge_distance``
    (the merge step would immediately undo it, and the two steps would oscillate).
    """
    pts, w = points[members], weights[members]
    if pts.shape[0] < 2:
        return None
    centre = (pts * w[:, None]).sum(0) / w.sum()
    centred = (pts - centre) * np.sqrt(w)[:, None]
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = (pts - centre) @ vt[0]
    side = proj > 0
    if side.all() or not side.any():
        return None
    a, b = members[side], members[~side]
    if weights[a].sum() < config.min_cluster_size or weights[b].sum() < config.min_cluster_size:
        return None
    ca = (points[a] * weights[a][:, None]).sum(0) / weights[a].sum()
    cb = (points[b] * weights[b][:, None]).sum(0) / weights[b].sum()
    if np.linalg.norm(ca - cb) < config.merge_distance:
        return None
    return ca, cb


def _split(points, weights, labels, centroids, config: IsodataConfig):
    """Split clusters whose spread exceeds ``split_variance``, widest first, up to ``max_clusters``."""
    k = centroids.shape[0]
    spreads = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        s = _spread(points[members], weights[members])
        if s > config.split_variance:
            spreads.append((-s, c, members))
    spreads.sort(key=lambda t: (t[0], t[1]))
    new = [centroids[c] for c in range(k)]
    split_any = False
    for _, c, members in spreads:
        if len(new) >= config.max_clusters:
            break
        halves = _try_split(points, weights, members, config)
        if halves is None:
            continue
        new[c] = halves[0]
        new.append(halves[1])
        split_any = True
    return np.array(new), split_any


def _merge(points, weights, labels, centroids, config: IsodataConfig):
    """Merge the closest centroid pairs nearer than ``merge_distance`` (closest first, each cluster
    at most once, at most ``max_merges_per_iter``). A merge whose union would exceed the split
    threshold is skipped, so that merge and split never undo each other."""
    k = centroids.shape[0]
    if k < 2 or config.max_merges_per_iter == 0:
        return centroids, False
    dist = np.sqrt(_sq_dists(centroids, centroids))
    cands = sorted(
        (float(dist[i, j]), i, j) for i in range(k) for j in range(i + 1, k) if dist[i, j] < config.merge_distance
    )
    used: set[int] = set()
    merged: dict[int, np.ndarray] = {}
    drop: set[int] = set()
    for _, i, j in cands:
        if len(merged) >= config.max_merges_per_iter:
            break
        if i in used or j in used:
            continue
        members = np.flatnonzero((labels == i) | (labels == j))
        if _spread(points[members], weights[members]) > config.split_variance:
            continue
        used.update((i, j))
        merged[i] = (points[members] * weights[members][:, None]).sum(0) / weights[members].sum()
        drop.add(j)
    if not merged:
        return centroids, False
    new = [merged.get(c, centroids[c]) for c in range(k) if c not in drop]
    return np.array(new), True


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..C-1 in order of first appearance."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(l), len(mapping)) for l in labels], dtype=np.int64)


def _distinct_rows(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows in first-appearance order, each row's index among them, and their multiplicities.

    Hashing row bytes is linear; ``np.unique(axis=0)`` sorts whole rows and dominated the cost of
    high-dimensional (lexical) embeddings."""
    first: dict[bytes, int] = {}
    inverse = np.empty(pts.shape[0], dtype=np.int64)
    for i, row in enumerate(np.ascontiguousarray(pts)):
        inverse[i] = first.setdefault(row.tobytes(), len(first))
    order = np.empty(len(first), dtype=np.int64)
    for i in range(pts.shape[0] - 1, -1, -1):
        order[inverse[i]] = i  # ends at each distinct row's first occurrence
    weights = np.bincount(inverse, minlength=len(first)).astype(np.float64)
    return pts[order], inverse, weights


def isodata(points: np.ndarray, config: IsodataConfig) -> np.ndarray:
    """Cluster labels ``(n,)``, numbered 0..C-1 by first appearance; seeded and deterministic.

    Each iteration: assign to the nearest centroid; dissolve clusters below ``min_cluster_size``;
    recompute centroids; split clusters whose spread exceeds ``split_variance``; if nothing was
    split, merge centroid pairs nearer than ``merge_distance``. Stops when the labels no longer
    change and nothing was split or merged, or after ``max_iter`` iterations.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2:
        raise ValueError(f"points must be a 2-D array, got shape {pts.shape}")
    n = pts.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Cluster distinct points only, weighted by multiplicity: duplicates cannot be separated.
    distinct, inverse, weights = _distinct_rows(pts)
    m = distinct.shape[0]
    if m == 1:
        return np.zeros(n, dtype=np.int64)

    rng = np.random.default_rng(config.seed)
    k0 = min(config.initial_k, m, config.max_clusters)
    centroids = _init_centroids(distinct, weights, k0, rng)
    labels = None
    for _ in range(config.max_iter):
        new_labels, centroids = _assign(distinct, weights, centroids, config.min_cluster_size)
        stable = labels is not None and np.array_equal(new_labels, labels)
        labels = new_labels
        changed = False
        if centroids.shape[0] < config.max_clusters:
            centroids, changed = _split(distinct, weights, labels, centroids, config)
        if not changed:
            centroids, changed = _merge(distinct, weights, labels, centroids, config)
        if stable and not changed:
            break
    else:
        # The cap was hit: labels must still match the final centroids.
        labels, _ = _assign(distinct, weights, centroids, config.min_cluster_size)
    return _first_appearance(labels[inverse])


def medoid_indices(points: np.ndarray, labels) -> list[int]:
    """Index of each cluster's medoid (the member with the least total Euclidean distance to the
    other members; ties -> lower index), listed by label 0..C-1."""
    pts = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return []
    out = []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            raise ValueError(f"cluster label {c} has no members; labels must be 0..C-1 without gaps")
        sub = pts[members]
        total = np.sqrt(_sq_dists(sub, sub)).sum(1)
        # Round so that float noise between equally central members falls to the lower index.
        out.append(int(members[int(np.argmin(np.round(total, 10)))]))
    return out
