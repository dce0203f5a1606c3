"""Rank many groups at once: one embedding call across all groups, each distinct text embedded once.

Embedding is nearly all the cost of ranking, and a sentence encoder pays a large fixed cost per
call; small policies also repeat themselves within and across prompts. So the ``Ranker`` gathers
every group's (cleaned) answers, embeds the distinct strings in a single call, and then runs the
cheap per-group maths (TextRank, ISODATA, pairs, noise) on slices of that matrix.
"""
from __future__ import annotations

import contextlib
import time
from typing import Sequence

import numpy as np

from selfrank.ranking.config import RankingConfig
from selfrank.ranking.embed import Embedder, make_embedder
from selfrank.ranking.engine import RankedGroup, prepare_responses, rank_group


_BLAS_CONTROLLER = None


@contextlib.contextmanager
def _blas_threads(threads: int):
    """Limit BLAS threads while ranking. The per-group matrices are tiny, so extra BLAS threads
    only spin, and on a busy machine they make each group's maths many times slower.
    threadpoolctl ships with sentence-transformers' dependencies; without it, nothing is limited."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()  # scanning the loaded libraries is slow: once
    if not _BLAS_CONTROLLER:
        yield
        return
    with _BLAS_CONTROLLER.limit(limits=threads, user_api="blas"):
        yield


def check_group(group: dict, where: str | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` if ``group`` is not ``{"id", "prompt", "responses"}`` with a
    non-empty list of strings; the message starts with ``where`` (default: the group's id). Called
    before the shared embedding so that one bad group cannot spoil the batch it came with, and by
    ``ranking.files`` on every input line (with ``where`` = file:line)."""
    if not isinstance(group, dict):
        raise TypeError(f"{where or 'group'}: expected a JSON object, got {type(group).__name__}")
    where = where or f"group {group.get('id')!r}"
    for key in ("id", "prompt", "responses"):
        if key not in group:
            raise ValueError(f"{where}: missing field '{key}'")
    if not isinstance(group["prompt"], str):
        raise TypeError(f"{where}: 'prompt' must be a string, got {type(group['prompt']).__name__}")
    responses = group["responses"]
    if not isinstance(responses, (list, tuple)):
        raise TypeError(f"{where}: 'responses' must be a list of strings, got {type(responses).__name__}")
    if not responses:
        raise ValueError(f"{where}: 'responses' is empty (need at least 1 response)")
    for i, text in enumerate(responses):
        if not isinstance(text, str):
            raise TypeError(f"{where}: 'responses[{i}]' must be a string, got {type(text).__name__}")


class Ranker:
    """Turns groups ``{"id", "prompt", "responses"}`` into ``RankedGroup``s.

    ``stats`` accumulates over calls: groups, texts, unique_texts, encode_calls, and seconds spent
    in ``embed_s`` (the encoder) and ``rank_s`` (TextRank + ISODATA + pairs + noise).
    """

    def __init__(self, config: RankingConfig, embedder: Embedder | None = None, seed: int = 0):
        self.config = config
        self.seed = seed
        self._embedder = embedder
        self.stats = {"groups": 0, "texts": 0, "unique_texts": 0, "encode_calls": 0, "embed_s": 0.0, "rank_s": 0.0}

    @property
    def embedder(self) -> Embedder:
        # Loaded on first use, so that building a Ranker is free until it has work.
        if self._embedder is None:
            self._embedder = make_embedder(self.config.embedder)
        return self._embedder

    def embed_groups(self, texts_per_group: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Embeddings per group from ONE encode call over the distinct texts of all groups."""
        index: dict[str, int] = {}
        unique: list[str] = []
        slots = []
        for texts in texts_per_group:
            rows = []
            for text in texts:
                if text not in index:
                    index[text] = len(unique)
                    unique.append(text)
                rows.append(index[text])
            slots.append(np.asarray(rows, dtype=np.int64))
        start = time.perf_counter()
        matrix = self.embedder.encode(unique) if unique else np.zeros((0, 1), dtype=np.float32)
        self.stats["embed_s"] += time.perf_counter() - start
        if unique:
            self.stats["encode_calls"] += 1
        self.stats["texts"] += sum(len(rows) for rows in slots)
        self.stats["unique_texts"] += len(unique)
        return [matrix[rows] for rows in slots]

    def rank(self, groups: Sequence[dict]) -> list[RankedGroup]:
        """Rank every group; raises on the first malformed group (see ``check_group``)."""
        for group in groups:
            check_group(group)
        cleaned = [prepare_responses(list(group["responses"]), self.config) for group in groups]
        embeddings = self.embed_groups(cleaned)
        start = time.perf_counter()
        with _blas_threads(self.config.embedder.threads):
            ranked = [
                rank_group(str(group["id"]), group["prompt"], texts, emb, self.config, seed=self.seed)
                for group, texts, emb in zip(groups, cleaned, embeddings)
            ]
        self.stats["rank_s"] += time.perf_counter() - start
        self.stats["groups"] += len(ranked)
        return ranked
