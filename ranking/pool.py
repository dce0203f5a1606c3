"""Asynchronous CPU ranking pool: rollout groups go in, ranked groups come out while generation goes on.

Layout (chosen for robustness, not just speed):

* Worker processes are started with the *spawn* method (torch state must not be forked) and each
  loads its ``Ranker`` (and so its embedding model) once.
* Each worker has its own duplex ``Pipe``; a dispatcher thread in the parent sends a batch of up to
  ``batch_groups`` groups to an idle worker and waits on all pipes and process sentinels with
  ``multiprocessing.connection.wait``. There is deliberately no shared ``multiprocessing.Queue``: a
  worker killed while holding its lock would wedge every other worker.
* A worker that dies is seen through its sentinel and replaced. The groups it held are ranked
  again, each alone, so that a poison group cannot take innocent ones down with it; a group is
  reported as failed only once workers have died ``max_solo_deaths`` times while holding it alone
  (the rule is in ``pool_isolation``). Results are keyed by submission, so a group is reported
  exactly once, in submit order from ``drain``, even if a late answer for it turns up.
* A group that raises (bad input, numerical error) comes back as a failed ``PoolResult`` with its
  error; the pool itself keeps going.
* ``submit`` blocks once ``max_pending`` groups are unfinished: backpressure on the producer instead
  of unbounded memory.
* ``close()`` stops the workers (politely, then terminate, then kill); it also runs from a finalizer
  and at interpreter exit, and workers are daemonic and exit when their pipe closes, so no worker
  outlives the parent.

The worker process lives in ``pool_worker``, the dispatcher thread in ``pool_supervisor``; this module
is the pool's interface.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from typing import Callable, Iterator

from selfrank.errors import UserError
from selfrank.ranking.config import RankingConfig
from selfrank.ranking.pool_supervisor import PoolError, PoolResult, _PoolState, _Task

log = logging.getLogger(__name__)



def wait_while(cond: threading.Condition, busy: Callable[[], object], timeout: float | None,
               check: Callable[[], None], timed_out: Callable[[], Exception]) -> None:
    """With ``cond`` held, wait until ``busy()`` is false. ``check()`` runs before each wait and raises
    when waiting is pointless (a broken or closed pool); ``timed_out()`` is raised once ``timeout``
    seconds have passed (None: no limit; 0: do not wait at all)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while busy():
        check()
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise timed_out()
        cond.wait(remaining if remaining is not None else 1.0)


def wait_for_room(cond: threading.Condition, gid: str, open_ids, count: Callable[[], int], max_pending: int,
                  block: bool, timeout: float | None, check: Callable[[], None]) -> None:
    """A pool's admission rule, with ``cond`` held: refuse an id among the unfinished groups
    (``ValueError``), then wait while ``count()`` groups are unfinished and that is ``max_pending``
    or more (``queue.Full`` at once if not ``block``, or after ``timeout`` seconds)."""
    check()
    if gid in open_ids:
        raise ValueError(f"group id {gid!r} is already in the pool")

    def full() -> queue.Full:
        if not block:
            return queue.Full(f"ranking pool is full ({max_pending} groups pending)")
        return queue.Full(f"ranking pool stayed full ({max_pending} groups pending) for {timeout} s")

    wait_while(cond, lambda: count() >= max_pending, timeout if block else 0.0, check, full)


class RankingPool:
    """A pool of CPU processes that rank groups asynchronously.

    >>> with RankingPool(config, workers=2) as pool:
    ...     pool.submit("q1", prompt, answers, policy_version=step)
    ...     for result in pool.poll(): ...        # whatever is ready, without waiting
    ...     results = pool.drain()                # the rest, in submit order

    A worker that dies is replaced and the groups it held are ranked again, each alone; a group is
    failed (with an error naming it) only once its worker has died ``max_solo_deaths`` times while
    ranking it alone (see ``ranking.pool_isolation``). ``start_timeout``: seconds to wait for the
    first worker to load its model.
    """

    def __init__(self, config: RankingConfig, workers: int = 1, max_pending: int = 256, batch_groups: int = 8,
                 max_solo_deaths: int = 3, seed: int = 0, start_timeout: float = 600.0):
        if workers < 1:
            raise UserError(f"ranking pool: workers must be >= 1, got {workers}")
        if max_pending < 1:
            raise UserError(f"ranking pool: max_pending must be >= 1, got {max_pending}")
        if batch_groups < 1:
            raise UserError(f"ranking pool: batch_groups must be >= 1, got {batch_groups}")
        if max_solo_deaths < 1:
            raise UserError(f"ranking pool: max_solo_deaths must be >= 1, got {max_solo_deaths}")
        self._state = _PoolState(config, workers, max_pending, batch_groups, max_solo_deaths, seed, start_timeout)
        self._finalizer = weakref.finalize(self, self._state.shutdown)

    def __enter__(self) -> "RankingPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- producer side

    def submit(self, group_id, prompt: str, responses, policy_version: int = 0,
               block: bool = True, timeout: float | None = None, ranker_id: str | None = None) -> None:
        """Queue one group. Blocks while ``max_pending`` groups are unfinished; raises ``queue.Full``
        if ``block`` is False or ``timeout`` seconds pass first. Group ids must be unique among the
        unfinished groups (``ValueError`` otherwise). ``ranker_id``: the id the ranker sees (it seeds
        the group's noise), when the pool id carries more (a node pool's routing tag)."""
        s = self._state
        gid = str(group_id)
        with s.cond:
            wait_for_room(s.cond, gid, s.open_ids, lambda: len(s.open), s.max_pending, block, timeout,
                          self._raise_if_unusable)
            now = time.monotonic()
            task = _Task(next(s.seq), gid, prompt, list(responses) if isinstance(responses, (list, tuple)) else responses,
                         int(policy_version), now)
            task.ranker_id = None if ranker_id is None else str(ranker_id)
            s.open[task.seq] = task
            s.open_ids[gid] = task.seq
            s.pending.append(task)
            s.counts["submitted"] += 1
            if s.first_submit is None:
                s.first_submit = now
            s._wake()

    # ---- consumer side

    def poll(self) -> list[PoolResult]:
        """Every finished result not yet handed out, in completion order; never waits."""
        s = self._state
        with s.cond:
            self._raise_if_fatal()
            out = list(s.finished.values())
            s.finished.clear()
            return out

    def results(self, timeout: float | None = None) -> Iterator[PoolResult]:
        """Yield results as they finish until every submitted group has been handed out (groups
        submitted meanwhile included). ``timeout``: longest wait for the next one (``TimeoutError``)."""
        s = self._state
        while True:
            with s.cond:
                wait_while(s.cond, lambda: not s.finished and s.open, timeout, self._raise_if_unusable,
                           lambda: TimeoutError(f"no ranking result within {timeout} s ({len(s.open)} groups pending)"))
                self._raise_if_fatal()
                if not s.finished:
                    return
                _, result = s.finished.popitem(last=False)
            yield result

    def drain(self, timeout: float | None = None) -> list[PoolResult]:
        """Wait for every submitted group and return all results not yet handed out, in submit order."""
        s = self._state
        with s.cond:
            wait_while(s.cond, lambda: s.open, timeout, self._raise_if_unusable, lambda: TimeoutError(
                f"ranking pool not drained within {timeout} s ({len(s.open)} groups pending)"))
            self._raise_if_fatal()
            out = [s.finished[seq] for seq in sorted(s.finished)]
            s.finished.clear()
            return out

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has loaded its ranker (e.g. to keep start-up out of a timing)."""
        s = self._state
        with s.cond:
            wait_while(s.cond, lambda: any(w.state in ("starting", "dead") for w in s.workers), timeout,
                       self._raise_if_unusable, lambda: TimeoutError(f"ranking workers not ready within {timeout} s"))

    # ---- introspection

    def stats(self) -> dict:
        s = self._state
        with s.lock:
            latencies = sorted(s.latencies)
            done = s.counts["completed"] + s.counts["failed"]
            span = (s.last_finish - s.first_submit) if s.last_finish is not None and s.first_submit is not None else 0.0
            in_flight = sum(len(w.tasks) for w in s.workers)

            def quantile(q: float) -> float | None:
                if not latencies:
                    return None
                return latencies[min(len(latencies) - 1, int(round(q * (len(latencies) - 1))))]

            return {
                "workers": s.n_workers,
                "ready_workers": sum(w.state in ("idle", "busy") for w in s.workers),
                "queue_depth": len(s.pending),
                "in_flight": in_flight,
                "unfinished": len(s.open),
                "undelivered": len(s.finished),
                "submitted": s.counts["submitted"],
                "completed": s.counts["completed"],
                "failed": s.counts["failed"],
                "restarts": s.counts["restarts"],
                "retries": s.counts["retries"],
                "solo_deaths": s.counts["solo_deaths"],
                "duplicates_ignored": s.counts["duplicates_ignored"],
                "latency_mean_s": sum(latencies) / len(latencies) if latencies else None,
                "latency_p50_s": quantile(0.5),
                "latency_p95_s": quantile(0.95),
                "groups_per_s": done / span if span > 0 else None,
                "embed_s": s.timing["embed_s"],
                "rank_s": s.timing["rank_s"],
            }

    def assignments(self) -> dict[int, list[str]]:
        """``{worker pid: [group ids it is ranking now]}`` for the live, started workers."""
        s = self._state
        with s.lock:
            return {w.pid: [t.id for t in w.tasks] for w in s.workers if w.state in ("idle", "busy")}

    def worker_pids(self) -> list[int]:
        s = self._state
        with s.lock:
            return [w.pid for w in s.workers if w.state != "dead"]

    def close(self) -> None:
        """Stop the workers and the dispatcher; unfinished groups are dropped. Safe to call twice."""
        self._finalizer()

    # ---- helpers

    def _raise_if_fatal(self) -> None:
        fatal = self._state.fatal
        if fatal is not None:
            kind, text = fatal
            raise (UserError(text) if kind == "UserError" else PoolError(text))

    def _raise_if_unusable(self) -> None:
        self._raise_if_fatal()
        if self._state.closed:
            raise PoolError("ranking pool is closed")
