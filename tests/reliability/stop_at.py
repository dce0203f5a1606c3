"""Stop a ``selfrank`` process at a chosen point of its progress, so that kill tests do not depend on
the speed of the machine.

The process runs :func:`install` first. Once ``marker`` exists, it counts *progress points*: file
operations inside the stage folders (audit events, in the order the code makes them) and step
boundaries of the step loops (``selfrank.train.signals.stop_if_requested``). At the ``after``-th one it
stops itself with SIGSTOP; the test sees it stopped (:func:`is_stopped`), notes where it is, and
kills it. Where the kill lands is fixed by the code, the config and ``after``, not by timing.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

STAGE_FOLDERS = ("sft", "sample", "reward", "ppo", "eval")
_FILE_EVENTS = ("open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree")


def command(root: Path, marker: Path, after: int) -> list[str]:
    """The ``selfrank`` command line (arguments follow) of a process that stops as described above."""
    code = ("import sys; from tests.reliability.stop_at import install; "
            f"install({str(root)!r}, {str(marker)!r}, {int(after)}); "
            "from selfrank.launch.cli import main; sys.exit(main())")
    return [sys.executable, "-c", code]


def install(root: str, marker: str, after: int) -> None:
    folders = tuple(os.path.join(root, stage) + os.sep for stage in STAGE_FOLDERS)
    seen = {"armed": False, "count": 0}

    def progress() -> None:
        if not seen["armed"]:
            if not os.path.exists(marker):  # a stat: raises no audit event of its own
                return
            seen["armed"] = True
        if seen["count"] == after:
            os.kill(os.getpid(), signal.SIGSTOP)
        seen["count"] += 1

    def on_event(event: str, args: tuple) -> None:
        if event in _FILE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
            if os.fsdecode(args[0]).startswith(folders):
                progress()

    sys.addaudithook(on_event)

    import selfrank.train.signals as signals_module  # before any stage module binds stop_if_requested

    step_boundary = signals_module.stop_if_requested

    def counted(*args, **kwargs):
        progress()
        return step_boundary(*args, **kwargs)

    signals_module.stop_if_requested = counted


def is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (by a signal)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


def signal_when_stopped(process, signum: int, timeout: float = 600.0) -> int:
    """Once ``process`` has stopped itself, send it ``signum`` and let it go on; its exit code.
    A stop request (SIGTERM) thus arrives at a known point of its progress."""
    from tests.reliability.helpers import wait_for

    assert wait_for(lambda: is_stopped(process.pid), process, timeout=timeout), \
        f"the process ended (code {process.returncode}) before its stop point"
    os.kill(process.pid, signum)
    os.kill(process.pid, signal.SIGCONT)
    return process.wait(timeout=timeout)
