"""The ranking pool under kills and under load: nothing lost, nothing twice, bounded memory."""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from selfrank.ranking.pool import RankingPool
from tests.ranking.test_pool import LEXICAL, make_groups


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_soak_1000_groups_with_workers_killed_every_300ms():
    groups = make_groups(1000, k=8, seed=5)
    stop = threading.Event()
    kills = []
    rng = random.Random(11)
    with RankingPool(LEXICAL, workers=2, batch_groups=4, max_pending=64, max_retries=50) as pool:
        pool.wait_ready(timeout=120)

        def killer() -> None:
            while not stop.wait(rng.uniform(0.2, 0.4)):
                ready = pool.assignments()
                busy = [pid for pid, ids in ready.items() if ids]
                # Kill a random busy worker, while the other one is up (a restart costs ~1 s of CPU).
                if busy and len(ready) == 2:
                    pid = rng.choice(busy)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append(pid)
                    except ProcessLookupError:
                        pass

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        seen: dict[str, int] = {}
        try:
            for g in groups:
                pool.submit(g["id"], g["prompt"], g["responses"], timeout=120)
                for result in pool.poll():
                    seen[result.id] = seen.get(result.id, 0) + 1
                    assert result.ok, result.error
            for result in pool.results(timeout=120):
                seen[result.id] = seen.get(result.id, 0) + 1
                assert result.ok, result.error
        finally:
            stop.set()
            thread.join()
        stats = pool.stats()
    assert seen == {g["id"]: 1 for g in groups}  # every group ranked exactly once
    assert len(kills) >= 5, f"only {len(kills)} kills landed"
    assert stats["completed"] == 1000 and stats["failed"] == 0 and stats["restarts"] >= len(kills) - 1
    print(f"\nsoak: 1000 groups, {len(kills)} workers killed, {stats['restarts']} restarts, "
          f"{stats['retries']} retries")


@pytest.mark.slow
def test_10000_groups_fast_producer_backpressure_no_loss_flat_memory():
    total, max_pending = 10_000, 128
    groups = make_groups(500, k=8, seed=9)  # recycled under new ids: the producer outruns the workers
    with RankingPool(LEXICAL, workers=2, batch_groups=8, max_pending=max_pending) as pool:
        pool.wait_ready(timeout=120)
        rss = {"start": _rss_mb()}
        peak_unfinished, blocked, received = 0, 0, {}
        started = time.perf_counter()
        for i in range(total):
            g = groups[i % len(groups)]
            before = time.perf_counter()
            pool.submit(f"g{i}", g["prompt"], g["responses"])
            blocked += time.perf_counter() - before > 0.001
            peak_unfinished = max(peak_unfinished, pool.stats()["unfinished"]) if i % 50 == 0 else peak_unfinished
            if i % 200 == 0:
                for result in pool.poll():
                    received[result.id] = result.ok
            if i == total // 2:
                rss["middle"] = _rss_mb()
        for result in pool.results(timeout=300):
            received[result.id] = result.ok
        seconds = time.perf_counter() - started
        rss["end"] = _rss_mb()
        stats = pool.stats()
    assert len(received) == total and all(received.values())
    assert stats["completed"] == total and stats["failed"] == 0
    assert peak_unfinished <= max_pending
    assert blocked > 0, "the producer never waited: no backpressure was exercised"
    assert rss["end"] - rss["start"] < 60 and rss["middle"] - rss["start"] < 60, rss
    print(f"\nload: {total} groups in {seconds:.1f}s ({total / seconds:.0f} groups/s), submit blocked {blocked} "
          f"times, peak unfinished {peak_unfinished}/{max_pending}, parent RSS MB start {rss['start']:.1f} "
          f"middle {rss['middle']:.1f} end {rss['end']:.1f}")
