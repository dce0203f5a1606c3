"""One prompt's answers in, one ranked group out: TextRank, ISODATA, representatives, pairs, noise.

The caller embeds the answers (after ``prepare_responses``) and passes unit-normalised rows; this
module only combines the pure steps, in the paper's order: rank all answers first, then filter
near-duplicates, so that a cluster's representative keeps the score it earned among all answers.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from selfrank.ranking.cleanup import drop_incomplete_sentence
from selfrank.ranking.config import RankingConfig
from selfrank.ranking.isodata import isodata, medoid_indices
from selfrank.ranking.noise import perturb
from selfrank.ranking.pairs import interval_pairs
from selfrank.ranking.textrank import rank_order, textrank_scores

JSON_KEYS = ("id", "prompt", "responses", "scores", "order", "clusters", "representatives", "pairs", "noise")


@dataclass
class RankedGroup:
    id: str
    prompt: str
    responses: list[str]  # as given (after optional clean-up)
    scores: list[float]  # TextRank score per response (sum 1)
    order: list[int]  # indices of responses, best first (ties -> lower index)
    clusters: list[int]  # ISODATA label per response (all distinct if ISODATA is disabled)
    representatives: list[int]  # one index per cluster, ordered by TextRank score, best first
    pairs: list[tuple[int, int]]  # (winner_index, loser_index) into responses
    noise: list[dict | None] = field(default_factory=list)  # per pair: None or {"kind", "text", "detail"}

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "responses": list(self.responses),
            "scores": [float(s) for s in self.scores],
            "order": [int(i) for i in self.order],
            "clusters": [int(c) for c in self.clusters],
            "representatives": [int(i) for i in self.representatives],
            "pairs": [[int(w), int(l)] for w, l in self.pairs],
            "noise": [None if rec is None else dict(rec) for rec in self.noise],
        }

    @classmethod
    def from_json(cls, obj: dict) -> "RankedGroup":
        """Inverse of ``to_json`` (pairs come back as tuples)."""
        missing = [key for key in JSON_KEYS if key not in obj]
        if missing:
            raise ValueError(f"ranked group is missing keys: {', '.join(missing)}")
        for key in ("responses", "scores", "order", "clusters", "representatives", "pairs", "noise"):
            if not isinstance(obj[key], list):
                raise ValueError(f"ranked group: {key!r} must be a list")
        n = len(obj["responses"])
        if not all(isinstance(text, str) for text in obj["responses"]):
            raise ValueError("ranked group: 'responses' must hold strings")
        for key in ("scores", "order", "clusters"):
            if len(obj[key]) != n:
                raise ValueError(f"ranked group: {key!r} has {len(obj[key])} entries for {n} responses")
        if len(obj["noise"]) != len(obj["pairs"]):
            raise ValueError("ranked group: 'noise' must have one entry per pair")
        for pair in obj["pairs"]:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(i, int) and 0 <= i < n for i in pair)):
                raise ValueError(f"ranked group: bad pair {pair!r} (two response indices expected)")
        return cls(
            id=str(obj["id"]),
            prompt=obj["prompt"],
            responses=list(obj["responses"]),
            scores=[float(s) for s in obj["scores"]],
            order=[int(i) for i in obj["order"]],
            clusters=[int(c) for c in obj["clusters"]],
            representatives=[int(i) for i in obj["representatives"]],
            pairs=[(int(w), int(l)) for w, l in obj["pairs"]],
            noise=[None if rec is None else dict(rec) for rec in obj["noise"]],
        )

    def noised_pairs(self) -> list[tuple[str, str]]:
        """``(winner_text, loser_text)`` per pair, with the loser replaced by its perturbation if any."""
        out = []
        for (w, l), rec in zip(self.pairs, self.noise):
            out.append((self.responses[w], self.responses[l] if rec is None else rec["text"]))
        return out


def prepare_responses(responses: list[str], config: RankingConfig) -> list[str]:
    """Apply the configured clean-up; call this BEFORE embedding so that scores match the texts."""
    if config.drop_incomplete_sentence:
        return [drop_incomplete_sentence(text) for text in responses]
    return list(responses)


def stable_seed(*parts) -> int:
    """A 63-bit seed from the parts' text, identical across processes and Python versions
    (unlike ``hash()``, which is salted per process for strings)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rank_group(
    group_id: str,
    prompt: str,
    responses: list[str],
    embeddings: np.ndarray,
    config: RankingConfig,
    seed: int = 0,
) -> RankedGroup:
    """Rank one prompt's answers and derive its training pairs.

    ``embeddings``: float rows, one per response, unit-normalised (zero rows allowed, e.g. for
    empty answers). ``seed`` is mixed with ``config.noise.seed`` and the group id for the noise.
    """
    responses = list(responses)
    emb = np.asarray(embeddings, dtype=np.float64)
    n = len(responses)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"group {group_id!r}: expected embeddings of shape ({n}, d), got {emb.shape}")
    if not np.all(np.isfinite(emb)):
        raise ValueError(f"group {group_id!r}: embeddings contain NaN or inf")

    scores = textrank_scores(emb, config.textrank)
    order = rank_order(scores)
    if config.isodata.enabled and n > 0:
        labels = isodata(emb, config.isodata)
    else:
        labels = np.arange(n)
    position = {idx: pos for pos, idx in enumerate(order)}
    medoids = medoid_indices(emb, labels, preference=[position[i] for i in range(n)])
    representatives = sorted(medoids, key=lambda idx: position[idx])

    # Two identical texts teach the reward model nothing (only possible with ISODATA off, since
    # identical embeddings always share a cluster); such pairs are dropped.
    pairs = [
        (int(w), int(l))
        for w, l in interval_pairs(representatives, config.pairs.interval, config.pairs.all_cross_cluster)
        if responses[w] != responses[l]
    ]

    noise: list[dict | None] = [None] * len(pairs)
    if config.noise.enabled and config.noise.probability > 0 and pairs:
        rng = np.random.default_rng(stable_seed("noise", config.noise.seed, seed, group_id))
        for k, (_, loser) in enumerate(pairs):
            if rng.random() < config.noise.probability:
                _, record = perturb(responses[loser], rng, config.noise)
                noise[k] = record

    return RankedGroup(
        id=str(group_id),
        prompt=prompt,
        responses=responses,
        scores=[float(s) for s in scores],
        order=order,
        clusters=[int(c) for c in labels],
        representatives=[int(i) for i in representatives],
        pairs=pairs,
        noise=noise,
    )
