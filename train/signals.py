"""Graceful preemption: SIGTERM or SIGUSR1 ask the training loops to checkpoint and stop.

A cluster signals a job some time before it kills it (Slurm: ``--signal``; the job script in
``launch/slurm.py`` passes SIGTERM on to the trainer). The handlers installed here only set a flag;
the step loops call :func:`stop_if_requested` at step boundaries, where the state is consistent, so
the checkpoint they write there resumes exactly. The CLI turns :class:`Preempted` into exit code 143
(128 + SIGTERM), which the job script reads as "requeue me". A second SIGTERM means "now": the process
exits at once (files are written atomically, so nothing is left half-written).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a job ended by SIGTERM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: int | None = None  # the first stop signal, once one has arrived


class Preempted(Exception):
    """A stop signal arrived; the stage saved a checkpoint (if it has one) and stopped."""


def _on_signal(signum: int, frame) -> None:
    global _received
    if _received is not None and signum == signal.SIGTERM:
        # Asked twice: the sender will not wait for a checkpoint. Stop without running any cleanup.
        os.write(sys.stderr.fileno(), b"selfrank: second SIGTERM, exiting now\n")
        os._exit(EXIT_CODE)
    if _received is None:
        _received = signum
        log.warning("%s received: stopping at the next step boundary with a checkpoint",
                    signal.Signals(signum).name)


def install_stop_handlers() -> None:
    """Route SIGTERM and SIGUSR1 to the stop flag (call once, from the main thread)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)


def stop_requested() -> bool:
    """Whether a stop signal has arrived since the handlers were installed."""
    return _received is not None


def reset() -> None:
    """Forget a received signal (for a process that goes on after handling a stop)."""
    global _received
    _received = None


def stop_if_requested(what: str, step: int, save: Callable[[], object] | None, checkpoint: str | os.PathLike) -> None:
    """At a step boundary: if a stop was asked for, run ``save`` (write the checkpoint of the state
    before ``step``) and raise :class:`Preempted` naming where the run can be resumed from."""
    if _received is None:
        return
    if save is not None:
        save()
    name = signal.Signals(_received).name
    raise Preempted(f"{what}: stopped by {name} before step {step}; progress saved in {Path(checkpoint)} "
                    "(continue with --resume)")
