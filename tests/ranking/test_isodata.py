"""ISODATA: cluster count recovery, split, merge, dissolve, degenerate inputs, determinism."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from selfrank.ranking.config import IsodataConfig
from selfrank.ranking.isodata import isodata, medoid_indices


def blobs(k: int, per: int, d: int = 16, sigma: float = 0.03, seed: int = 0):
    """k well-separated Gaussian blobs on the unit sphere (spread ~ d * sigma^2, below 0.05)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pts = np.repeat(centres, per, axis=0) + sigma * rng.normal(size=(k * per, d))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    truth = np.repeat(np.arange(k), per)
    perm = rng.permutation(k * per)
    return pts[perm], truth[perm]


def same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return all((a[i] == a[j]) == (b[i] == b[j]) for i, j in itertools.combinations(range(len(a)), 2))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("initial_k", [1, 2, 8])
def test_recovers_the_number_of_blobs(k, initial_k):
    for seed in range(3):
        pts, truth = blobs(k, 5, seed=seed)
        labels = isodata(pts, IsodataConfig(initial_k=initial_k, seed=seed))
        assert labels.max() + 1 == k, (seed, labels)
        assert same_partition(labels, truth)


def test_labels_are_numbered_by_first_appearance():
    pts, _ = blobs(4, 4, seed=1)
    labels = isodata(pts, IsodataConfig(initial_k=4))
    seen = []
    for label in labels:
        if label not in seen:
            seen.append(int(label))
    assert seen == list(range(len(seen)))


def test_splits_a_stretched_cluster_along_its_long_axis():
    rng = np.random.default_rng(2)
    axis = np.zeros(8)
    axis[3] = 1.0
    t = np.concatenate([rng.uniform(-0.6, -0.25, 10), rng.uniform(0.25, 0.6, 10)])
    pts = 0.01 * rng.normal(size=(20, 8)) + t[:, None] * axis
    spread = ((pts - pts.mean(0)) ** 2).sum(1).mean()
    assert spread > 0.05  # the premise: one cluster would be too wide
    labels = isodata(pts, IsodataConfig(initial_k=1, split_variance=0.05, merge_distance=0.3))
    assert labels.max() + 1 == 2
    assert same_partition(labels, t > 0)
    # With a threshold above its spread, the same cloud stays one cluster.
    assert isodata(pts, IsodataConfig(initial_k=1, split_variance=spread * 1.01)).max() == 0


def test_merges_clusters_with_near_centroids():
    rng = np.random.default_rng(3)
    pts = np.vstack([0.02 * rng.normal(size=(6, 4)), [0.15, 0, 0, 0] + 0.02 * rng.normal(size=(6, 4))])
    # Centroids ~0.15 apart: merged under merge_distance 0.3, kept apart under 0.1.
    assert isodata(pts, IsodataConfig(initial_k=2, merge_distance=0.3)).max() == 0
    assert same_partition(isodata(pts, IsodataConfig(initial_k=2, merge_distance=0.1)), [0] * 6 + [1] * 6)
    # One tight blob started with many clusters collapses to one ...
    blob = 0.03 * rng.normal(size=(12, 4))
    assert isodata(blob, IsodataConfig(initial_k=6)).max() == 0
    # ... but not when merging is switched off.
    assert isodata(blob, IsodataConfig(initial_k=6, max_merges_per_iter=0)).max() >= 1


def test_merge_never_creates_a_cluster_wider_than_the_split_threshold():
    # Two 4-point rings 0.28 apart: centroids nearer than merge_distance (0.3), but their union
    # would be wider (0.035 + 0.14^2) than split_variance, so they must stay apart.
    a = 0.187
    ring = np.array([[0, a, 0, 0], [0, -a, 0, 0], [0, 0, a, 0], [0, 0, -a, 0]])
    pts = np.vstack([ring, ring + [0.28, 0, 0, 0]])
    assert ((pts - pts.mean(0)) ** 2).sum(1).mean() > 0.05
    for initial_k in (4, 8):
        for seed in range(3):
            labels = isodata(pts, IsodataConfig(initial_k=initial_k, seed=seed))
            assert list(labels) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_merge_rate_is_limited_per_iteration():
    rng = np.random.default_rng(4)
    blob = 0.03 * rng.normal(size=(16, 4))
    cfg = dict(initial_k=8, max_merges_per_iter=1, seed=0)
    # One iteration: k-means step, then at most one merge; the last assignment sees 7 clusters at least.
    one = isodata(blob, IsodataConfig(max_iter=1, **cfg))
    assert one.max() + 1 >= 7
    assert isodata(blob, IsodataConfig(max_iter=20, **cfg)).max() == 0


def test_small_clusters_are_dissolved():
    rng = np.random.default_rng(5)
    pts = np.vstack([0.02 * rng.normal(size=(8, 4)), [[3.0, 0, 0, 0]]])
    assert isodata(pts, IsodataConfig(initial_k=2, min_cluster_size=1)).max() == 1
    labels = isodata(pts, IsodataConfig(initial_k=2, min_cluster_size=2))
    assert labels.max() == 0
    # A group smaller than the minimum is one cluster, not an error.
    assert list(isodata(pts[:3], IsodataConfig(initial_k=3, min_cluster_size=5))) == [0, 0, 0]


def test_max_clusters_caps_the_count():
    pts, _ = blobs(5, 4, seed=6)
    assert isodata(pts, IsodataConfig(initial_k=1, max_clusters=3)).max() + 1 <= 3
    assert isodata(pts, IsodataConfig(initial_k=8, max_clusters=2)).max() + 1 <= 2


def test_fewer_points_than_k_and_trivial_sizes():
    far = np.eye(3) * 5.0
    assert list(isodata(far, IsodataConfig(initial_k=10))) == [0, 1, 2]
    assert list(isodata(far[:1], IsodataConfig(initial_k=10))) == [0]
    assert isodata(np.zeros((0, 3)), IsodataConfig()).shape == (0,)
    assert list(isodata(np.ones((4, 3)), IsodataConfig(initial_k=4))) == [0, 0, 0, 0]


def test_identical_points_always_share_a_cluster():
    for seed in range(12):
        rng = np.random.default_rng(seed)
        base = rng.normal(size=(5, 6))
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        idx = rng.integers(0, 5, size=12)  # random duplicates of 5 distinct answers
        pts = base[idx]
        labels = isodata(pts, IsodataConfig(initial_k=int(rng.integers(1, 9)), seed=seed))
        for i, j in itertools.combinations(range(12), 2):
            if idx[i] == idx[j]:
                assert labels[i] == labels[j]
        assert labels.max() + 1 <= len(set(idx.tolist()))


def test_seeded_and_deterministic():
    pts, _ = blobs(3, 6, sigma=0.12, seed=7)  # wide blobs: the seed matters
    cfg = IsodataConfig(initial_k=3, seed=11)
    first = isodata(pts, cfg)
    for _ in range(3):
        assert np.array_equal(isodata(pts.copy(), cfg), first)


def brute_medoids(points, labels):
    out = []
    for c in range(max(labels) + 1):
        members = [i for i, l in enumerate(labels) if l == c]
        costs = [sum(np.linalg.norm(points[i] - points[j]) for j in members) for i in members]
        best = min(costs)
        out.append(next(i for i, cost in zip(members, costs) if abs(cost - best) < 1e-9))
    return out


def test_medoids_match_brute_force_and_break_ties_low():
    line = np.array([[0.0], [1.0], [2.0], [10.0]])
    assert medoid_indices(line, [0, 0, 0, 0]) == [1]  # 1 and 2 tie at total distance 11
    rng = np.random.default_rng(8)
    for _ in range(5):
        pts = rng.normal(size=(15, 3))
        labels = rng.permutation(np.arange(15) % 4).tolist()
        got = medoid_indices(pts, labels)
        assert got == brute_medoids(pts, labels)
        assert [labels[i] for i in got] == [0, 1, 2, 3]
    assert medoid_indices(np.zeros((0, 2)), []) == []
    with pytest.raises(ValueError):
        medoid_indices(line, [0, 2, 2, 0])
