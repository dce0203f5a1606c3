"""RankingPool: real worker processes (spawn), real kills, real backpressure."""
from __future__ import annotations

import gc
import multiprocessing
import os
import queue
import time

import numpy as np
import pytest

from selfrank.ranking.config import EmbedderConfig, RankingConfig
from selfrank.ranking.pool import RankingPool
from selfrank.ranking.ranker import Ranker
from tests.ranking.gates import (UPPER_BOUND_S, Gates, Poison, as_ranked, holder, kill_holding_a_batch,
                                 wait_until)

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


def submit_all(pool, groups: list[dict], **kwargs) -> None:
    for g in groups:
        pool.submit(g["id"], g["prompt"], g["responses"], **kwargs)


def expected_rankings(groups: list[dict]) -> list[dict]:
    return [r.to_json() for r in Ranker(LEXICAL).rank([as_ranked(g) for g in groups])]


def test_results_match_in_process_ranking_in_submit_order(tmp_path):
    gates = Gates(tmp_path)
    held, gate = gates.group("held")
    groups = make_groups(40)
    with RankingPool(LEXICAL, workers=2, batch_groups=4) as pool:
        pool.wait_ready(timeout=UPPER_BOUND_S)
        # One worker waits at the gate while the other ranks: both take part, whatever the scheduler does.
        pool.submit(held["id"], held["prompt"], held["responses"], policy_version=0)
        wait_until(lambda: holder(pool, "held"))
        for version, g in enumerate(groups, start=1):
            pool.submit(g["id"], g["prompt"], g["responses"], policy_version=version)
        gate.open()
        results = pool.drain(timeout=UPPER_BOUND_S)
        stats = pool.stats()
    assert [r.id for r in results] == ["held"] + [g["id"] for g in groups]
    assert [r.policy_version for r in results] == list(range(len(groups) + 1))
    assert [r.ranked.to_json() for r in results] == expected_rankings([held] + groups)
    assert all(r.ok and r.latency_s > 0 for r in results)
    assert {r.worker for r in results} == {0, 1}
    assert stats["completed"] == 41 and stats["failed"] == 0 and stats["restarts"] == 0
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


def test_backpressure_poll_results_and_failed_groups(tmp_path):
    groups = make_groups(6)
    held, gate = Gates(tmp_path).group("held")
    with RankingPool(LEXICAL, workers=1, max_pending=2) as pool:
        pool.wait_ready(timeout=UPPER_BOUND_S)
        pool.submit(held["id"], held["prompt"], held["responses"])
        wait_until(lambda: holder(pool, "held"))  # the only worker waits at the gate: nothing can finish
        pool.submit("g0", "p", groups[0]["responses"])
        with pytest.raises(ValueError, match="already in the pool"):
            pool.submit("g0", "p", groups[0]["responses"])
        with pytest.raises(queue.Full):
            pool.submit("g1", "p", groups[1]["responses"], block=False)
        start = time.monotonic()
        with pytest.raises(queue.Full):
            pool.submit("g1", "p", groups[1]["responses"], timeout=0.2)
        assert time.monotonic() - start >= 0.2
        assert pool.stats()["unfinished"] == 2
        gate.open()
        # Blocking submits go through as soon as the worker frees room.
        pool.submit("bad", "p", ["fine", 3], timeout=UPPER_BOUND_S)
        for g in groups[1:]:
            pool.submit(g["id"], g["prompt"], g["responses"], timeout=UPPER_BOUND_S)
        seen = {}
        for result in pool.results(timeout=UPPER_BOUND_S):
            seen[result.id] = result
        assert pool.poll() == [] and pool.drain() == []
        pool.submit("late", "p", ["lambda cannot travel", lambda: None])
        (late,) = pool.drain()
    assert set(seen) == {"held", "bad"} | {g["id"] for g in groups}
    assert seen["bad"].ranked is None and "'responses[1]' must be a string, got int" in seen["bad"].error
    assert all(r.ok for key, r in seen.items() if key != "bad")
    assert late.ranked is None and "cannot send" in late.error


def test_workers_killed_from_outside_never_fail_a_group(tmp_path):
    """Four SIGKILLs at chosen points (gates fix what the victim holds): a batch of four; then one group
    of that batch twice more while it runs alone (the case that used to fail it); a batch again.
    Every group completes, exactly once, in submit order, ranked as in process."""
    gates = Gates(tmp_path)
    submitted: list[dict] = []
    results = []

    def submit(groups: list[dict]) -> None:
        submit_all(pool, groups)
        submitted.extend(groups)

    def kill_a_worker_holding_a_batch(tag: str, then_alone: int = 0) -> list[list[str]]:
        innocents = [{**x, "id": f"{tag}-{x['id']}"} for x in make_groups(3, seed=len(submitted))]
        held = kill_holding_a_batch(pool, gates, submit, innocents, tag, then_alone)
        results.extend(pool.drain(timeout=UPPER_BOUND_S))
        return held

    with RankingPool(LEXICAL, workers=2, batch_groups=4) as pool:  # default max_solo_deaths: 3
        pool.wait_ready(timeout=UPPER_BOUND_S)
        submit(make_groups(40, k=12, seed=2))
        held_first = kill_a_worker_holding_a_batch("one", then_alone=2)
        submit([{**x, "id": f"two-{x['id']}"} for x in make_groups(40, k=12, seed=3)])
        held_last = kill_a_worker_holding_a_batch("three")
        stats = pool.stats()
    assert held_first == [["one-g0", "one-g1", "one-g2", "one-gate"], ["one-gate"], ["one-gate"]]
    assert held_last == [["three-g0", "three-g1", "three-g2", "three-gate"]]
    assert [r.id for r in results] == [g["id"] for g in submitted]  # each exactly once, in submit order
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert [r.ranked.to_json() for r in results] == expected_rankings(submitted)
    assert stats["restarts"] == 4 and stats["solo_deaths"] == 2 and stats["retries"] == 10
    assert stats["failed"] == 0 and stats["completed"] == len(submitted)


@pytest.mark.parametrize("max_solo_deaths", [1, 3])
def test_poison_group_is_isolated_and_fails_alone_while_its_batch_completes(tmp_path, max_solo_deaths):
    groups = make_groups(5)
    batch = groups[:2] + [{"id": "poison", "prompt": "p", "responses": ["looks harmless", Poison()]}] + groups[2:]
    held, gate = Gates(tmp_path).group("held")
    with RankingPool(LEXICAL, workers=1, batch_groups=8, max_solo_deaths=max_solo_deaths) as pool:
        pool.wait_ready(timeout=UPPER_BOUND_S)
        pool.submit(held["id"], held["prompt"], held["responses"])
        wait_until(lambda: holder(pool, "held"))
        submit_all(pool, batch)
        gate.open()  # the worker comes back and takes all six queued groups as one batch: it dies
        results = pool.drain(timeout=UPPER_BOUND_S)
        stats = pool.stats()
        pool.submit("after", "p", groups[0]["responses"])  # the pool still works
        (after,) = pool.drain(timeout=UPPER_BOUND_S)
    assert [r.id for r in results] == ["held"] + [g["id"] for g in batch]
    by_id = {r.id: r for r in results}
    poison = by_id.pop("poison")
    assert all(r.ok for r in by_id.values()) and after.ok
    assert [by_id[g["id"]].ranked.to_json() for g in groups] == expected_rankings(groups)
    assert poison.ranked is None and poison.worker == -1
    assert poison.error.startswith("group 'poison' could not be ranked")
    times = "1 time" if max_solo_deaths == 1 else f"{max_solo_deaths} times"
    assert f"died each time it ranked this group alone ({times}, last exit code 7)" in poison.error
    # One death in the batch (nobody charged), then max_solo_deaths deaths of the poison alone.
    assert stats["restarts"] == 1 + max_solo_deaths and stats["solo_deaths"] == max_solo_deaths
    assert stats["failed"] == 1 and stats["completed"] == 6


def test_no_worker_outlives_close_even_when_the_caller_raises():
    with pytest.raises(RuntimeError, match="caller bug"):
        with RankingPool(LEXICAL, workers=2) as pool:
            pool.wait_ready(timeout=600)
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
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=120)
    assert multiprocessing.active_children() == []
