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

This module imports nothing heavy at load time: a spawned worker imports it before it has set its
thread limits, and the limits must be in the environment before numpy or torch are imported.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Callable, Iterator

from selfrank.ranking.config import RankingConfig
from selfrank.errors import UserError
from selfrank.ranking.pool_isolation import blame_death, take_batch

if TYPE_CHECKING:
    from selfrank.ranking.engine import RankedGroup

log = logging.getLogger(__name__)

# Consecutive worker deaths before a worker ever became ready: the workers cannot start at all.
MAX_STARTUP_FAILURES = 3
_LATENCY_WINDOW = 10000


class PoolError(RuntimeError):
    """The pool cannot go on (its workers cannot start, or it is closed)."""


@dataclass
class PoolResult:
    id: str
    policy_version: int
    ranked: "RankedGroup | None"  # None when the group failed
    error: str | None  # "ExceptionType: message" when the group failed
    latency_s: float  # submit to result
    worker: int  # slot of the worker that answered (-1: failed without a worker answering)

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------- worker side

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _thread_limits_in_environ(threads: int):
    """Put the thread limits in the environment a spawned worker inherits.

    Setting them inside the worker is too late when the parent's main module (which a spawned
    child re-imports first) imports numpy: OpenBLAS reads its limit once, at load, and with more
    threads than free cores its spinning threads make small matrix ops ~50x slower.
    """
    with _ENV_LOCK:
        saved = {var: os.environ.get(var) for var in _THREAD_VARS}
        os.environ.update({var: str(threads) for var in _THREAD_VARS})
        try:
            yield
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _rank_batch(ranker, tasks: list) -> list:
    """``[(seq, ranked | None, error | None)]``; a bad group fails alone, never its batch."""
    from selfrank.ranking.ranker import check_group

    out: dict[int, tuple] = {}
    good = []
    for seq, gid, prompt, responses in tasks:
        group = {"id": gid, "prompt": prompt, "responses": responses}
        try:
            check_group(group)
            good.append((seq, group))
        except Exception as exc:
            out[seq] = (None, _describe(exc))
    try:
        for (seq, _), ranked in zip(good, ranker.rank([g for _, g in good])):
            out[seq] = (ranked, None)
    except Exception:
        # Find the culprit: rank one by one (the shared embedding call is lost, correctness is not).
        for seq, group in good:
            try:
                out[seq] = (ranker.rank([group])[0], None)
            except Exception as exc:
                out[seq] = (None, _describe(exc))
    return [(seq, *out[seq]) for seq, *_ in tasks]


def _worker_main(conn, config: RankingConfig, seed: int) -> None:
    """Entry point of a worker process: load the ranker once, then rank batches until told to stop."""
    threads = str(config.embedder.threads)
    for var in _THREAD_VARS:
        os.environ[var] = threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from selfrank.ranking.embed import LEXICAL
        from selfrank.ranking.ranker import Ranker

        if config.embedder.name != LEXICAL:
            import torch

            torch.set_num_threads(config.embedder.threads)
        ranker = Ranker(config, seed=seed)
        ranker.embedder  # load the model now, before reporting ready
        # The first group pays for lazy imports (networkx, scipy: ~0.5 s): pay it with a throwaway group,
        # so that a (re)started worker never holds real groups through it.
        ranker.rank([{"id": "warm-up", "prompt": "warm up", "responses": ["warm up one", "warm up two"]}])
    except BaseException as exc:
        kind = "UserError" if isinstance(exc, UserError) else "error"
        try:
            conn.send(("fatal", kind, str(exc) if kind == "UserError" else _describe(exc)))
        except OSError:
            pass
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message[0] == "stop":
            return
        before = (ranker.stats["embed_s"], ranker.stats["rank_s"])
        results = _rank_batch(ranker, message[1])
        timing = (ranker.stats["embed_s"] - before[0], ranker.stats["rank_s"] - before[1])
        try:
            conn.send(("done", results, timing))
        except OSError:
            return


# --------------------------------------------------------------------------- parent side

@dataclass
class _Task:
    seq: int
    id: str
    prompt: str
    responses: list
    policy_version: int
    submitted: float
    suspect: bool = False  # was held by a worker that died: ranked alone from now on
    solo_deaths: int = 0  # workers that died while holding this group alone
    ranker_id: str | None = None  # the id the ranker sees (it seeds noise), if not ``id``


class _Worker:
    def __init__(self, slot: int, process, conn):
        self.slot = slot
        self.process = process
        self.conn = conn
        self.state = "starting"  # -> "idle" <-> "busy"; "dead"
        self.tasks: list[_Task] = []
        self.pid = process.pid


class _PoolState:
    """Everything the dispatcher thread touches; kept apart from ``RankingPool`` so that a finalizer
    can shut it down without holding the pool object alive."""

    def __init__(self, config: RankingConfig, workers: int, max_pending: int, batch_groups: int,
                 max_solo_deaths: int, seed: int, start_timeout: float):
        self.config = config
        self.n_workers = workers
        self.max_pending = max_pending
        self.batch_groups = batch_groups
        self.max_solo_deaths = max_solo_deaths
        self.seed = seed
        self.start_timeout = start_timeout
        self.ctx = mp.get_context("spawn")
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.seq = itertools.count()
        self.pending: collections.deque[_Task] = collections.deque()
        self.open: dict[int, _Task] = {}  # submitted, not finished
        self.open_ids: dict[str, int] = {}
        self.finished: collections.OrderedDict[int, PoolResult] = collections.OrderedDict()
        self.workers: list[_Worker] = []
        self.closing = False
        self.closed = False
        self.fatal: tuple[str, str] | None = None
        self.startup_failures = 0
        self.counts = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self.first_submit: float | None = None
        self.last_finish: float | None = None
        self.timing = {"embed_s": 0.0, "rank_s": 0.0}
        self.wake_r, self.wake_w = self.ctx.Pipe(duplex=False)
        self.wake_sent = False
        for slot in range(workers):
            self.workers.append(self._start_worker(slot))
        self.thread = threading.Thread(target=self._loop, name="ranking-pool-dispatcher", daemon=True)
        self.thread.start()

    # ---- workers

    def _start_worker(self, slot: int) -> _Worker:
        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(
            target=_worker_main, args=(child_conn, self.config, self.seed),
            name=f"ranking-worker-{slot}", daemon=True,
        )
        with _thread_limits_in_environ(self.config.embedder.threads):
            process.start()
        child_conn.close()  # the worker's end lives in the worker only: its death closes the pipe
        log.debug("ranking worker %d started (pid %d)", slot, process.pid)
        return _Worker(slot, process, parent_conn)

    def _wake(self) -> None:
        # Called with the lock held; one pending byte is enough to interrupt the dispatcher's wait.
        if not self.wake_sent:
            self.wake_sent = True
            self.wake_w.send_bytes(b"w")

    def _fail_everything(self, message: str) -> None:
        for task in sorted(self.open.values(), key=lambda t: t.seq):
            self._finish(task, None, message, -1)
        self.pending.clear()

    # ---- dispatcher thread

    def _loop(self) -> None:
        try:
            while True:
                with self.lock:
                    if self.closing:
                        return
                    self._dispatch()
                    watch = {self.wake_r: None}
                    for worker in self.workers:
                        if worker.state != "dead":
                            watch[worker.conn] = worker
                            watch[worker.process.sentinel] = worker
                ready = wait(list(watch), timeout=1.0)
                with self.lock:
                    died = []
                    for obj in ready:
                        worker = watch[obj]
                        if worker is None:
                            while self.wake_r.poll():
                                self.wake_r.recv_bytes()
                            self.wake_sent = False
                        elif obj is worker.conn:
                            if not self._receive(worker):
                                died.append(worker)
                        else:
                            died.append(worker)
                    for worker in dict.fromkeys(died):
                        self._on_death(worker)
                    self._check_start_timeout()
                    self.cond.notify_all()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            log.exception("ranking pool dispatcher crashed")
            with self.lock:
                self.fatal = ("error", f"dispatcher crashed: {_describe(exc)}")
                self._fail_everything(self.fatal[1])
                self.cond.notify_all()

    def _dispatch(self) -> None:
        if self.fatal is not None:
            return
        idle = [w for w in self.workers if w.state == "idle"]
        for i, worker in enumerate(idle):
            if not self.pending:
                return
            # Share the queue evenly among idle workers, up to batch_groups each.
            size = min(self.batch_groups, math.ceil(len(self.pending) / (len(idle) - i)))
            batch = take_batch(self.pending, size)  # a group that was with a dying worker goes alone
            payload = [(t.seq, t.ranker_id or t.id, t.prompt, t.responses) for t in batch]
            try:
                worker.conn.send(("rank", payload))
            except (OSError, EOFError):
                # Dying worker: its sentinel fires next; keep the groups for another one.
                self.pending.extendleft(reversed(batch))
                worker.state = "busy"
                continue
            except Exception:
                # Something in the batch cannot be pickled: fail exactly those groups.
                keep = []
                for task in batch:
                    try:
                        pickle.dumps((task.id, task.prompt, task.responses))
                        keep.append(task)
                    except Exception as exc:
                        self._finish(task, None, f"cannot send group to a worker: {_describe(exc)}", -1)
                self.pending.extendleft(reversed(keep))
                continue
            worker.tasks = batch
            worker.state = "busy"

    def _receive(self, worker: _Worker) -> bool:
        """Handle every message waiting on a worker's pipe; False if the pipe is closed."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                kind = message[0]
                if kind == "ready":
                    worker.state = "idle"
                    worker.pid = message[1]
                    self.startup_failures = 0
                elif kind == "done":
                    _, results, timing = message
                    held = {t.seq: t for t in worker.tasks}
                    for seq, ranked, error in results:
                        task = held.get(seq)
                        if task is None or seq not in self.open:
                            self.counts["duplicates_ignored"] += 1
                            continue
                        self._finish(task, ranked, error, worker.slot)
                    self.timing["embed_s"] += timing[0]
                    self.timing["rank_s"] += timing[1]
                    worker.tasks = []
                    worker.state = "idle"
                elif kind == "fatal":
                    _, err_kind, text = message
                    if self.fatal is None:
                        self.fatal = (err_kind, text)
                        log.error("ranking worker %d cannot start: %s", worker.slot, text)
                        self._fail_everything(f"ranking workers cannot start: {text}")
            return True
        except (EOFError, OSError):
            return False

    def _on_death(self, worker: _Worker) -> None:
        if worker.state == "dead":
            return
        self._receive(worker)  # anything it managed to send before dying still counts
        was_starting = worker.state == "starting"
        worker.state = "dead"
        worker.process.join(timeout=1.0)
        if worker.process.is_alive():  # its pipe broke but it lingers: make sure it is gone
            worker.process.kill()
            worker.process.join(timeout=2.0)
        worker.conn.close()
        orphans = [t for t in worker.tasks if t.seq in self.open]
        worker.tasks = []
        if self.closing or self.fatal is not None:
            return
        exit_code = worker.process.exitcode
        log.warning("ranking worker %d (pid %s) died (exit code %s) holding %d group(s); restarting%s",
                    worker.slot, worker.pid, exit_code, len(orphans),
                    "; each is ranked again alone" if len(orphans) > 1 else "")
        retry = []
        self.counts["solo_deaths"] += len(orphans) == 1
        for task, fail in zip(orphans, blame_death(orphans, self.max_solo_deaths)):
            if fail:
                times = f"{task.solo_deaths} time{'s' if task.solo_deaths != 1 else ''}"
                error = (f"group {task.id!r} could not be ranked: the ranking worker died each time it ranked "
                         f"this group alone ({times}, last exit code {exit_code})")
                log.error("%s", error)
                self._finish(task, None, error, -1)
            else:
                retry.append(task)
                self.counts["retries"] += 1
        self.pending.extendleft(sorted(retry, key=lambda t: t.seq, reverse=True))
        if was_starting:
            self.startup_failures += 1
            if self.startup_failures >= MAX_STARTUP_FAILURES:
                self.fatal = ("error", f"ranking workers die before they are ready (exit code {exit_code})")
                self._fail_everything(self.fatal[1])
                return
        self.counts["restarts"] += 1
        self.workers[worker.slot] = self._start_worker(worker.slot)

    def _check_start_timeout(self) -> None:
        if self.fatal is None and self.start_timeout and all(w.state in ("starting", "dead") for w in self.workers):
            oldest = getattr(self, "_no_ready_since", None)
            now = time.monotonic()
            if oldest is None:
                self._no_ready_since = now
            elif now - oldest > self.start_timeout:
                self.fatal = ("error", f"no ranking worker became ready within {self.start_timeout:.0f} s")
                self._fail_everything(self.fatal[1])
        else:
            self._no_ready_since = None

    def _finish(self, task: _Task, ranked, error: str | None, slot: int) -> None:
        if self.open.pop(task.seq, None) is None:
            self.counts["duplicates_ignored"] += 1
            return
        if self.open_ids.get(task.id) == task.seq:
            del self.open_ids[task.id]
        now = time.monotonic()
        latency = now - task.submitted
        self.finished[task.seq] = PoolResult(task.id, task.policy_version, ranked, error, latency, slot)
        self.counts["failed" if error is not None else "completed"] += 1
        self.latencies.append(latency)
        self.last_finish = now

    # ---- shutdown

    def shutdown(self, timeout: float = 5.0) -> None:
        with self.lock:
            if self.closed:
                return
            self.closing = True
            self.closed = True
            try:
                self._wake()
            except OSError:
                pass
            self.cond.notify_all()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=timeout)
        for worker in self.workers:
            if worker.state != "dead":
                try:
                    worker.conn.send(("stop",))
                except (OSError, EOFError):
                    pass
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=2.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=2.0)
            worker.conn.close()
            worker.process.close()
            worker.state = "dead"
        self.wake_r.close()
        self.wake_w.close()


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
