"""Graceful stops: SIGTERM, SIGUSR1 (and, in the CLI, Ctrl-C) ask the training loops to checkpoint and stop.

A cluster signals a job some time before it kills it (Slurm: ``--signal``; the job script in
``launch/slurm.py`` passes SIGTERM on to the trainer). The handlers installed here only set a flag;
the step loops call :func:`stop_if_requested` at step boundaries, where the state is consistent, so
the checkpoint they write there resumes exactly. The CLI turns :class:`Preempted` into exit code 143
(128 + SIGTERM), which the job script reads as "requeue me", or 130 after Ctrl-C. A second SIGTERM
means "now": the process exits at once (files are written atomically, so nothing is left
half-written); a second Ctrl-C raises ``KeyboardInterrupt`` at once.
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
INTERRUPT_EXIT_CODE = 128 + signal.SIGINT  # 130, what a shell reports for Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: int | None = None  # the first stop signal, once one has arrived
# Whether the work under way stops at step boundaries (a training or sample stage): elsewhere (eval,
# start-up) there is no checkpoint to wait for, so Ctrl-C stops at once.
_stops_at_steps = False


class Preempted(Exception):
    """A stop signal arrived; the stage saved a checkpoint (if it has one) and stopped.

    ``stage``: what stopped (e.g. "ppo", "sft lora"); ``step``: the step it stopped before;
    ``checkpoint``: where its progress is; ``signal_name``: SIGTERM, SIGUSR1 or SIGINT."""

    def __init__(self, message: str, *, stage: str = "", step: int | None = None,
                 checkpoint: str | os.PathLike | None = None, signal_name: str = "SIGTERM"):
        super().__init__(message)
        self.stage = stage
        self.step = step
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT_CODE if self.signal_name == "SIGINT" else EXIT_CODE


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


def _on_interrupt(signum: int, frame) -> None:
    """Ctrl-C: the first one stops at the next step boundary with a checkpoint, a second one (or one
    where no step boundary comes: eval, start-up) at once."""
    global _received
    if _received is not None or not _stops_at_steps:
        raise KeyboardInterrupt
    _received = signum
    _say("\nselfrank: Ctrl-C: stopping at the next step boundary with a checkpoint (press Ctrl-C again to stop "
         "at once)\n")


def _say(text: str) -> None:
    """Straight to stderr's file descriptor (a write to the buffered stream could re-enter one the main
    thread was making); to the stream itself when it has no descriptor (a captured stderr)."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError and a ValueError
        sys.stderr.write(text)


def install_stop_handlers(interrupt: bool = False) -> None:
    """Route SIGTERM and SIGUSR1 (and SIGINT with ``interrupt``) to the stop flag; call once, from the
    main thread. The CLI passes ``interrupt=True``; library users keep Python's own Ctrl-C."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    if interrupt:
        signal.signal(signal.SIGINT, _on_interrupt)


def set_stops_at_steps(value: bool) -> None:
    """Say whether the work under way checks :func:`stop_if_requested` at its step boundaries."""
    global _stops_at_steps
    _stops_at_steps = value


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
                    "(continue with --resume)", stage=what, step=step, checkpoint=checkpoint, signal_name=name)
