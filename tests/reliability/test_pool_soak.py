"""The ranking pool under kills and under load: nothing lost, nothing twice, bounded memory."""
from __future__ import annotations

import multiprocessing
import queue
import time

import pytest

from selfrank.ranking.pool import RankingPool
from tests.ranking.gates import UPPER_BOUND_S, Gates, holder, kill_holder, kill_holding_a_batch, wait_until
from tests.ranking.test_pool import LEXICAL, make_groups


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_soak_1000_groups_with_a_worker_killed_after_every_100(tmp_path):
    """After every 100th submitted group a worker is SIGKILLed at a point the test chose (gate
    groups hold it there): alternately while it holds one group alone and while it holds a batch of
    four. Nine kills, landing where intended whatever the speed of the machine."""
    groups = make_groups(1000, k=8, seed=5)
    gates = Gates(tmp_path)
    kills: list[list[str]] = []
    seen: dict[str, int] = {}
    submitted: list[str] = []

    def take(results) -> None:
        for result in results:
            seen[result.id] = seen.get(result.id, 0) + 1
            assert result.ok, result.error

    def submit(batch: list[dict]) -> None:
        for g in batch:
            pool.submit(g["id"], g["prompt"], g["responses"], timeout=UPPER_BOUND_S)
            submitted.append(g["id"])
            take(pool.poll())

    with RankingPool(LEXICAL, workers=2, batch_groups=4, max_pending=64) as pool:
        pool.wait_ready(timeout=UPPER_BOUND_S)
        rss_start = _rss_mb()
        for start in range(0, 1000, 100):
            if start:
                if start % 200:  # a gate group alone (nothing else queued): the worker taking it is killed there
                    take(pool.results(timeout=UPPER_BOUND_S))
                    gated, gate = gates.group(f"alone{start}")
                    submit([gated])
                    kills.append(kill_holder(pool, gated["id"]))
                    gate.open()
                else:  # the next three groups and a gate group as one batch
                    kills += kill_holding_a_batch(pool, gates, submit, groups[start:start + 3], f"batch{start}")
            submit([g for g in groups[start:start + 100] if g["id"] not in submitted])
        take(pool.results(timeout=UPPER_BOUND_S))
        rss_end = _rss_mb()
        stats = pool.stats()
        pids = pool.worker_pids()
    assert [len(ids) for ids in kills] == [1, 4] * 4 + [1]
    assert seen == {gid: 1 for gid in submitted} and len(submitted) == 1000 + 5 + 4 * 3
    assert stats["completed"] == len(submitted) and stats["failed"] == 0
    assert stats["restarts"] == 9 and stats["solo_deaths"] == 5 and stats["retries"] == 5 + 4 * 4
    assert len(pids) == 2 and multiprocessing.active_children() == []  # no killed worker left behind
    assert rss_end - rss_start < 60, (rss_start, rss_end)
    print(f"\nsoak: {len(submitted)} groups, {len(kills)} workers killed, {stats['retries']} groups re-run alone, "
          f"parent RSS MB {rss_start:.1f} -> {rss_end:.1f}")


@pytest.mark.slow
def test_10000_groups_fast_producer_backpressure_no_loss_flat_memory(tmp_path):
    total, max_pending = 10_000, 128
    groups = make_groups(500, k=8, seed=9)  # recycled under new ids: the producer outruns the workers
    gates = Gates(tmp_path)
    with RankingPool(LEXICAL, workers=2, batch_groups=8, max_pending=max_pending) as pool:
        pool.wait_ready(timeout=UPPER_BOUND_S)
        rss = {"start": _rss_mb()}
        # Both workers wait at a gate until the pool has been full once: backpressure is exercised
        # whatever the relative speed of producer and workers.
        held = [gates.group(f"held{n}") for n in range(2)]
        for gated, _ in held:
            pool.submit(gated["id"], gated["prompt"], gated["responses"])
            wait_until(lambda: holder(pool, gated["id"]))
        peak_unfinished, blocked, received = 0, 0, {}
        started = time.perf_counter()
        for i in range(total):
            g = groups[i % len(groups)]
            try:
                pool.submit(f"g{i}", g["prompt"], g["responses"], block=False)
            except queue.Full:  # the producer has to wait
                blocked += 1
                for _, gate in held:
                    gate.open()
                held = []
                pool.submit(f"g{i}", g["prompt"], g["responses"], timeout=UPPER_BOUND_S)
            peak_unfinished = max(peak_unfinished, pool.stats()["unfinished"]) if i % 50 == 0 else peak_unfinished
            if i % 200 == 0:
                for result in pool.poll():
                    received[result.id] = result.ok
            if i == total // 2:
                rss["middle"] = _rss_mb()
        for result in pool.results(timeout=UPPER_BOUND_S):
            received[result.id] = result.ok
        seconds = time.perf_counter() - started
        rss["end"] = _rss_mb()
        stats = pool.stats()
    assert len(received) == total + 2 and all(received.values())
    assert stats["completed"] == total + 2 and stats["failed"] == 0
    assert peak_unfinished <= max_pending
    assert blocked > 0, "the producer never waited: no backpressure was exercised"
    assert rss["end"] - rss["start"] < 60 and rss["middle"] - rss["start"] < 60, rss
    print(f"\nload: {total} groups in {seconds:.1f}s ({total / seconds:.0f} groups/s), submit blocked {blocked} "
          f"times, peak unfinished {peak_unfinished}/{max_pending}, parent RSS MB start {rss['start']:.1f} "
          f"middle {rss['middle']:.1f} end {rss['end']:.1f}")
