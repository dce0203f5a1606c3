"""The ranking pool's supervisor: a dispatcher thread that sends batches of groups to idle workers,
collects their answers, replaces dead workers and re-runs the groups they held (see ``pool`` for the
design and ``pool_isolation`` for the rule that decides when a group has failed)."""
from __future__ import annotations

import collections
import itertools
import logging
import math
import multiprocessing as mp
import pickle
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import TYPE_CHECKING

from selfrank.ranking.config import RankingConfig
from selfrank.ranking.pool_isolation import blame_death, take_batch
from selfrank.ranking.pool_worker import _describe, _thread_limits_in_environ, _worker_main

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
