"""Steering a ranking pool's workers from inside a group, for tests that must not depend on timing.

A *gate* response blocks the worker that receives it (in ``open`` of a named pipe, while unpickling
its batch) until the test opens the gate; it then arrives as the gate's path, a plain string. While
it is shut, the parent's view of that worker is frozen: it holds exactly the batch the gate came in,
so a test can kill it, or keep it busy, at a point it chose. A *poison* response kills the worker
that unpickles it. Both act through ``__reduce__``: the pool itself has no hook for them.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

UPPER_BOUND_S = 120.0  # against hangs only: every wait below ends on a condition, not on a clock


def wait_until(predicate, timeout: float = UPPER_BOUND_S, what: str = "condition"):
    """Poll ``predicate`` until it returns something true (and return that)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.005)


def _pass_gate(path: str) -> str:
    """What a gate turns into when unpickled (in whichever process receives it)."""
    with open(path, "rb"):  # blocks until a writer opens the pipe
        pass
    return path


class Gate:
    """A response that holds the worker unpickling it until :meth:`open` (see module doc)."""

    def __init__(self, path: Path):
        self.path = str(path)
        os.mkfifo(self.path)

    def __reduce__(self):
        return (_pass_gate, (self.path,))

    def open(self, timeout: float = UPPER_BOUND_S) -> None:
        """Let the worker waiting at this gate through; waits for one to be there first. Call it
        only once the pool has seen any earlier holder die (a dying reader would take the pass)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody waits
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                assert time.monotonic() < deadline, f"nobody came to the gate {self.path} within {timeout} s"
                time.sleep(0.005)
                continue
            os.close(fd)  # the waiting reader's open returns: a writer came
            return


class Poison:
    """A response whose unpickling kills the worker that receives it (exit code 7)."""

    def __reduce__(self):
        return (os._exit, (7,))


class Gates:
    """Makes gate groups in a folder and does the common moves with them."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.made = 0

    def group(self, gid: str) -> tuple[dict, Gate]:
        """A group with one gate response; ``group["responses"]`` holds the Gate object."""
        self.made += 1
        gate = Gate(self.folder / f"gate-{self.made}")
        return {"id": gid, "prompt": f"prompt of {gid}",
                "responses": ["red river at morning", gate, "a slow train to the city"]}, gate


def as_ranked(group: dict) -> dict:
    """The group as the worker ranks it: each gate replaced by the string it arrives as."""
    return {**group, "responses": [r.path if isinstance(r, Gate) else r for r in group["responses"]]}


def holder(pool, gid: str) -> tuple[int, list[str]] | None:
    """``(pid, ids held)`` of the worker holding group ``gid``, or None."""
    return next(((pid, ids) for pid, ids in pool.assignments().items() if gid in ids), None)


def kill_holder(pool, gid: str) -> list[str]:
    """SIGKILL the worker holding gate group ``gid`` (waits until one holds it) and wait until the pool
    has replaced it; returns the ids that worker held. The gate keeps the holding fixed until then."""
    restarts = pool.stats()["restarts"]
    pid, ids = wait_until(lambda: holder(pool, gid), what=f"a worker holding {gid}")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pool.stats()["restarts"] > restarts, what="the pool replacing the killed worker")
    return ids


def kill_holding_a_batch(pool, gates: Gates, submit, batch: list[dict], tag: str, then_alone: int = 0) -> list[list[str]]:
    """SIGKILL a worker while it holds ``batch`` and a gate group as one batch, then (``then_alone``
    times) the worker re-running the gate group alone; returns what each victim held.

    For a pool of two workers with ``batch_groups`` > len(batch). ``submit(groups)`` submits and
    records. Each worker is first held at a gate of its own (so everything submitted before has been
    dispatched); the queued ``batch`` + gate group then goes, whole, to the first one let through."""
    (a, gate_a), (b, gate_b), (g, gate_g) = (gates.group(f"{tag}-{n}") for n in ("a", "b", "gate"))
    submit([a])
    wait_until(lambda: holder(pool, a["id"]), what=f"a worker at {a['id']}")
    submit([b])
    wait_until(lambda: holder(pool, b["id"]), what=f"the other worker at {b['id']}")
    submit(batch + [g])
    gate_a.open()
    held = [kill_holder(pool, g["id"])]
    held += [kill_holder(pool, g["id"]) for _ in range(then_alone)]
    gate_g.open()  # this time it passes
    gate_b.open()
    return held
