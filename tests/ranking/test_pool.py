"""RankingPool: real worker processes (spawn), real kills, real backpressure."""
from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import signal
import time

import numpy as np
import pytest

from selfrank.ranking.config import EmbedderConfig, RankingConfig
from selfrank.ranking.pool import RankingPool
from selfrank.ranking.ranker import Ranker

LEXICAL = RankingConfig(embedder=EmbedderConfig(name="lexical", lexical_dim=256))
WORDS = ("red blue green small large quick slow happy sad bright dark river mountain city road "
         "train ticket station morning evening coffee tea music film book").split()


def make_groups(n: int, k: int = 8, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"g{i}", "prompt": f"prompt {i}",
             "responses": [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 16)))) for _ in range(k)]}
            for i in range(n)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split(")")[-1].split()[0] != "Z"


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class Poison:
    """A response whose unpickling kills the process that receives it: a group that kills every
    worker it is sent to."""

    def __reduce__(self):
        return (os._exit, (7,))


def test_results_match_in_process_ranking_in_submit_order():
    groups = make_groups(40)
    expected = [r.to_json() for r in Ranker(LEXICAL).rank(groups)]
    with RankingPool(LEXICAL, workers=2, batch_groups=4) as pool:
        for version, g in enumerate(groups):
            pool.submit(g["id"], g["prompt"], g["responses"], policy_version=version)
        results = pool.drain()
        stats = pool.stats()
    assert [r.id for r in results] == [g["id"] for g in groups]
    assert [r.policy_version for r in results] == list(range(len(groups)))
    assert [r.ranked.to_json() for r in results] == expected
    assert all(r.ok and r.latency_s > 0 for r in results)
    assert {r.worker for r in results} == {0, 1}  # both workers took part
    assert stats["completed"] == 40 and stats["failed"] == 0 and stats["restarts"] == 0
    assert stats["unfinished"] == 0 and stats["queue_depth"] == 0 and stats["in_flight"] == 0
    assert 0 < stats["latency_p50_s"] <= stats["latency_p95_s"] and stats["groups_per_s"] > 0


def test_sbert_pool_matches_in_process_ranking():
    config = RankingConfig()
    groups = make_groups(6, k=5, seed=1)
    expected = Ranker(config).rank(groups)
    with RankingPool(config, workers=1) as pool:
        for g in groups:
            pool.submit(g["id"], g["prompt"], g["responses"])
        got = [r.ranked for r in pool.drain()]
    for a, b in zip(got, expected):
        assert a.order == b.order and a.clusters == b.clusters and a.pairs == b.pairs
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def test_backpressure_poll_results_and_failed_groups():
    groups = make_groups(6)
    with RankingPool(LEXICAL, workers=1, max_pending=2) as pool:
        # Workers are still starting, so nothing can finish yet: the third group does not fit.
        pool.submit("g0", "p", groups[0]["responses"])
        with pytest.raises(ValueError, match="already in the pool"):
            pool.submit("g0", "p", groups[0]["responses"])
        pool.submit("bad", "p", ["fine", 3])
        with pytest.raises(queue.Full):
            pool.submit("g1", "p", groups[1]["responses"], block=False)
        start = time.monotonic()
        with pytest.raises(queue.Full):
            pool.submit("g1", "p", groups[1]["responses"], timeout=0.2)
        assert time.monotonic() - start >= 0.2
        assert pool.stats()["unfinished"] == 2
        # Blocking submits go through as soon as the worker frees room.
        for g in groups[1:]:
            pool.submit(g["id"], g["prompt"], g["responses"], timeout=60)
        seen = {}
        for result in pool.results(timeout=60):
            seen[result.id] = result
        assert pool.poll() == [] and pool.drain() == []
        pool.submit("late", "p", ["lambda cannot travel", lambda: None])
        (late,) = pool.drain()
    assert set(seen) == {"bad"} | {g["id"] for g in groups}
    assert seen["bad"].ranked is None and "responses[1] is int" in seen["bad"].error
    assert all(r.ok for key, r in seen.items() if key != "bad")
    assert late.ranked is None and "cannot send" in late.error


def test_killed_workers_are_replaced_and_no_group_is_lost_or_duplicated():
    groups = make_groups(120, k=12, seed=2)
    expected = {r.id: r.to_json() for r in Ranker(LEXICAL).rank(groups)}
    kills = 0
    with RankingPool(LEXICAL, workers=2, batch_groups=4) as pool:
        pool.wait_ready(timeout=60)
        for g in groups:
            pool.submit(g["id"], g["prompt"], g["responses"])
        while kills < 3:
            busy = [pid for pid, ids in pool.assignments().items() if ids]
            if not busy:
                assert pool.stats()["unfinished"] > 0, "ran out of work before three kills"
                time.sleep(0.005)
                continue
            os.kill(busy[0], signal.SIGKILL)
            kills += 1
            wait_until(lambda: pool.stats()["restarts"] == kills)
        results = pool.drain(timeout=120)
        stats = pool.stats()
    ids = [r.id for r in results]
    assert ids == [g["id"] for g in groups]  # each exactly once, in submit order
    assert all(r.ok for r in results)
    assert {r.id: r.ranked.to_json() for r in results} == expected
    assert stats["restarts"] == 3 and stats["completed"] == 120 and stats["failed"] == 0


def test_poison_group_fails_after_retries_and_spares_its_batch():
    groups = make_groups(3)
    with RankingPool(LEXICAL, workers=1, batch_groups=8, max_retries=1) as pool:
        pool.submit(groups[0]["id"], "p", groups[0]["responses"])
        pool.submit("poison", "p", ["looks harmless", Poison()])
        pool.submit(groups[1]["id"], "p", groups[1]["responses"])
        results = {r.id: r for r in pool.drain(timeout=120)}
        stats = pool.stats()
        pool.submit(groups[2]["id"], "p", groups[2]["responses"])  # the pool still works
        (after,) = pool.drain(timeout=60)
    assert results["poison"].ranked is None and "killed 2 ranking workers" in results["poison"].error
    assert results["g0"].ok and results["g1"].ok and after.ok
    assert stats["restarts"] == 2 and stats["failed"] == 1 and stats["completed"] == 2


def test_no_worker_outlives_close_even_when_the_caller_raises():
    with pytest.raises(RuntimeError, match="caller bug"):
        with RankingPool(LEXICAL, workers=2) as pool:
            pool.wait_ready(timeout=60)
            pids = pool.worker_pids()
            pool.submit("g", "p", ["some words here", "other words there"])
            raise RuntimeError("caller bug")
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)
    assert multiprocessing.active_children() == []

    # Dropped without close(): the finalizer stops the workers.
    pool = RankingPool(LEXICAL, workers=1)
    pids = pool.worker_pids()
    del pool
    gc.collect()
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=15)
    assert multiprocessing.active_children() == []
