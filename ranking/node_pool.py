"""One ranking pool per node, shared by that node's training processes.

Under a launcher every node runs several ranks (one per GPU) but has one set of CPUs. Giving each
rank its own ``RankingPool`` would split the CPUs blindly and load the embedder once per rank; here
local rank 0 runs a single ``RankingPool`` sized to the node and serves it on a Unix socket, and
every local rank (rank 0 included) talks to it through a ``NodePoolClient`` that has the pool's own
interface (``submit`` / ``poll`` / ``drain`` / ``stats`` / ``close``).

* Routing: the server tags each group with its client's number, so a result goes back to the rank
  that submitted it (two ranks may use the same group ids).
* Backpressure: a client blocks once ``max_pending`` of its own groups are unfinished, and the
  server's reader for that client blocks while the shared pool is full, so a slow pool stalls the
  producers instead of growing memory anywhere.
* Security: the socket file is private to the user (mode 0600) and connections are authenticated
  with a random key (``multiprocessing.connection``'s HMAC handshake) that the job shares over its
  process group, never through the file system or the environment.
* Failure: a pool that cannot go on (workers that cannot start) is reported to every client, which
  raises on its next call; a client that disconnects leaves the others running.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import queue
import socket
import threading
import time
from multiprocessing.connection import Client, Listener
from typing import Iterator

from selfrank.ranking.config import RankingConfig
from selfrank.errors import UserError
from selfrank.ranking.pool import PoolError, PoolResult, RankingPool, wait_for_room, wait_while

log = logging.getLogger(__name__)

_SEP = "\x1f"  # client number / group id separator inside the shared pool
_ROUTE_IDLE_S = 0.005  # how long the router sleeps when no result is ready


class NodePoolServer:
    """A ``RankingPool`` served to the processes of one node (see module doc)."""

    def __init__(self, config: RankingConfig, address: str, authkey: bytes, workers: int = 1,
                 max_pending: int = 256, **pool_kwargs):
        self.address = address
        self._authkey = authkey
        self.pool = RankingPool(config, workers=workers, max_pending=max_pending, **pool_kwargs)
        old_umask = os.umask(0o177)  # the socket file is created 0600: only this user may connect
        try:
            self._listener = Listener(address, family="AF_UNIX", authkey=authkey)
        finally:
            os.umask(old_umask)
        self._clients: dict[int, tuple] = {}  # number -> (connection, send lock)
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._accept, name="node-pool-accept", daemon=True),
                         threading.Thread(target=self._route, name="node-pool-route", daemon=True)]
        for thread in self._threads:
            thread.start()

    # ---- threads

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self._listener.accept()
            except Exception:  # listener closed, or a client that failed the handshake
                if self._closed.is_set():
                    return
                log.warning("node ranking pool: a connection was refused (bad key?)")
                continue
            if self._closed.is_set():
                conn.close()
                return
            number = next(self._numbers)
            send_lock = threading.Lock()
            with self._lock:
                self._clients[number] = (conn, send_lock)
            threading.Thread(target=self._serve, args=(number, conn, send_lock), name=f"node-pool-client-{number}",
                             daemon=True).start()

    def _send(self, number: int, message: tuple) -> None:
        with self._lock:
            entry = self._clients.get(number)
        if entry is None:
            return
        conn, send_lock = entry
        try:
            with send_lock:
                conn.send(message)
        except (OSError, EOFError, ValueError):
            self._drop(number)

    def _drop(self, number: int) -> None:
        """Stop serving a client: its socket is shut down, which ends its serving thread's ``recv``;
        that thread closes the connection (closing it under a reading thread is not safe)."""
        with self._lock:
            entry = self._clients.pop(number, None)
        if entry is not None:
            _shut_down(entry[0])

    def _serve(self, number: int, conn, send_lock: threading.Lock) -> None:
        """Serve one client until it leaves or is dropped, then close its connection (this thread
        owns it; a send still in progress on another thread finishes first)."""
        try:
            self._serve_requests(number, conn)
        finally:
            self._drop(number)
            with send_lock:
                conn.close()

    def _serve_requests(self, number: int, conn) -> None:
        """Read one client's requests; pool.submit blocks while the pool is full (backpressure)."""
        while not self._closed.is_set():
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "submit":
                _, group_id, prompt, responses, version = message
                try:
                    self.pool.submit(f"{number}{_SEP}{group_id}", prompt, responses, policy_version=version,
                                     ranker_id=group_id)
                except (PoolError, UserError) as exc:
                    self._send(number, ("fatal", type(exc).__name__, str(exc)))
                except Exception as exc:  # e.g. a duplicate id: that group fails, the client goes on
                    self._send(number, ("failed", group_id, version, f"{type(exc).__name__}: {exc}"))
            elif kind == "stats":
                self._send(number, ("stats", self.pool.stats()))
            elif kind == "close":
                break

    def _route(self) -> None:
        """Hand each finished group to the client that submitted it."""
        while not self._closed.is_set():
            try:
                results = self.pool.poll()
            except (PoolError, UserError) as exc:
                with self._lock:
                    numbers = list(self._clients)
                for number in numbers:
                    self._send(number, ("fatal", type(exc).__name__, str(exc)))
                return
            if not results:
                time.sleep(_ROUTE_IDLE_S)
                continue
            for result in results:
                number, _, group_id = result.id.partition(_SEP)
                result.id = group_id
                self._send(int(number), ("result", result))

    # ---- control

    def wait_ready(self, timeout: float | None = None) -> None:
        self.pool.wait_ready(timeout)

    def close(self) -> None:
        """Stop serving and stop the pool's workers. Safe to call twice."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:  # wake the accept() call (closing a listening socket does not interrupt it)
            Client(self.address, family="AF_UNIX", authkey=self._authkey).close()
        except Exception:
            pass
        self._listener.close()
        with self._lock:
            numbers = list(self._clients)
        for number in numbers:
            self._drop(number)
        self.pool.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> "NodePoolServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _shut_down(conn) -> None:
    """Shut the socket down: this wakes a thread blocked in recv() on it (here or at the other end),
    which a bare close() does not."""
    with contextlib.suppress(OSError, ValueError):
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:  # shutdown acts on the socket, not the fd
            sock.shutdown(socket.SHUT_RDWR)


class NodePoolClient:
    """One process's handle on a node's pool: the ``RankingPool`` interface over a socket."""

    def __init__(self, address: str, authkey: bytes, max_pending: int = 256, connect_timeout: float = 60.0):
        if max_pending < 1:
            raise UserError(f"ranking pool: max_pending must be >= 1, got {max_pending}")
        self.max_pending = max_pending
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._conn = Client(address, family="AF_UNIX", authkey=authkey)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise PoolError(f"node ranking pool at {address} did not answer within {connect_timeout} s")
                time.sleep(0.05)
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._seq = itertools.count()
        self._open: dict[str, int] = {}  # group id -> submit sequence number
        self._finished: dict[int, PoolResult] = collections.OrderedDict()  # seq -> result, completion order
        self._stats: queue.Queue = queue.Queue()
        self._fatal: tuple[str, str] | None = None
        self._closed = False
        self._counts = {"submitted": 0, "completed": 0, "failed": 0}
        self._latencies: list[float] = []
        self._reader = threading.Thread(target=self._read, name="node-pool-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                with self._cond:
                    if not self._closed and self._fatal is None:
                        self._fatal = ("PoolError", "node ranking pool went away")
                    self._cond.notify_all()
                return
            kind = message[0]
            if kind == "stats":
                self._stats.put(message[1])
                continue
            with self._cond:
                if kind == "fatal":
                    self._fatal = (message[1], message[2])
                else:
                    if kind == "failed":
                        _, group_id, version, error = message
                        result = PoolResult(group_id, version, None, error, 0.0, -1)
                    else:
                        result = message[1]
                    seq = self._open.pop(result.id, None)
                    if seq is not None:  # late duplicates (none expected) are ignored
                        self._finished[seq] = result
                        self._counts["completed" if result.ok else "failed"] += 1
                        self._latencies.append(result.latency_s)
                self._cond.notify_all()

    def _raise_if_unusable(self) -> None:
        if self._fatal is not None:
            kind, text = self._fatal
            raise (UserError(text) if kind == "UserError" else PoolError(text))
        if self._closed:
            raise PoolError("ranking pool is closed")

    def submit(self, group_id, prompt: str, responses, policy_version: int = 0,
               block: bool = True, timeout: float | None = None) -> None:
        gid = str(group_id)
        with self._cond:
            wait_for_room(self._cond, gid, self._open, lambda: len(self._open), self.max_pending, block, timeout,
                          self._raise_if_unusable)
            self._open[gid] = next(self._seq)
            self._counts["submitted"] += 1
        with self._send_lock:
            self._conn.send(("submit", gid, prompt, list(responses) if isinstance(responses, (list, tuple))
                             else responses, int(policy_version)))

    def poll(self) -> list[PoolResult]:
        with self._cond:
            self._raise_if_unusable()
            out = list(self._finished.values())
            self._finished.clear()
            return out

    def results(self, timeout: float | None = None) -> Iterator[PoolResult]:
        while True:
            with self._cond:
                wait_while(self._cond, lambda: not self._finished and self._open, timeout, self._raise_if_unusable,
                           lambda: TimeoutError(f"no ranking result within {timeout} s ({len(self._open)} pending)"))
                if not self._finished:
                    return
                _, result = self._finished.popitem(last=False)
            yield result

    def drain(self, timeout: float | None = None) -> list[PoolResult]:
        with self._cond:
            wait_while(self._cond, lambda: self._open, timeout, self._raise_if_unusable, lambda: TimeoutError(
                f"ranking pool not drained within {timeout} s ({len(self._open)} pending)"))
            out = [self._finished[seq] for seq in sorted(self._finished)]
            self._finished.clear()
            return out

    def stats(self, timeout: float = 30.0) -> dict:
        """The shared pool's stats (queue depth, workers, groups/s) plus this client's own counts."""
        with self._cond:
            self._raise_if_unusable()
            own = {f"client_{k}": v for k, v in self._counts.items()}
            own["client_unfinished"] = len(self._open)
            latencies = list(self._latencies)
        own["client_latency_mean_s"] = sum(latencies) / len(latencies) if latencies else None
        with self._send_lock:
            self._conn.send(("stats",))
        try:
            shared = self._stats.get(timeout=timeout)
        except queue.Empty:
            raise PoolError(f"node ranking pool gave no stats within {timeout} s") from None
        return {**shared, **own}

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        try:
            with self._send_lock:
                self._conn.send(("close",))
        except (OSError, ValueError):
            pass
        _shut_down(self._conn)  # ends the reader's recv(); then the connection is ours alone to close
        self._reader.join(timeout=5)
        with self._send_lock:
            self._conn.close()

    def __enter__(self) -> "NodePoolClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
