"""What every stage receives besides its config, run folder and resume flag: where to report, and how
to wait for the other processes.

Every stage module exposes ``run(config, run, resume, ctx) -> dict | None``: the stage summary (saved
as its ``DONE.json``) on the main process, None on the others under a launcher.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from selfrank.train import dist

# Waiting at a barrier of the sample/eval stages has no practical deadline (the process group's own
# timeout is minutes, and one process may finish its share long before another).
_WAIT_TIMEOUT = timedelta(days=30)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@dataclass
class Hooks:
    """Where stages report, all optional (no-ops by default); called on the main process only.

    ``log(metrics, step, stage)``: scalars of one step of a stage (SFT loss/lr, RM loss/accuracy, PPO
    metrics, eval metrics at step 0). ``log_table(name, groups, stage)``: ranked groups
    (``RankedGroup.to_json()`` dicts) for a table of sampled answers. ``log_files(paths)``: report files
    to keep as artifacts.
    """
    log: Callable[[dict, int, str], None] = _ignore
    log_table: Callable[[str, list[dict], str], None] = _ignore
    log_files: Callable[[list[Path]], None] = _ignore

    @property
    def wants_tables(self) -> bool:
        """Whether tables reach a tracker (building one may cost work, e.g. scoring answers)."""
        return self.log_table is not _ignore

    def stage_log(self, stage: str, prefix: str = "") -> Callable[[dict, int], None]:
        """``log(metrics, step)`` for one stage (keys under ``prefix``), silent on non-main ranks."""
        if not dist.is_main():
            return _ignore
        return lambda metrics, step: self.log({prefix + k: v for k, v in metrics.items()}, step, stage)


class Barrier:
    """Barriers for a multi-process run: ``wait`` has no practical deadline (a gloo group of its own)."""

    def __init__(self):
        self.world = dist.world_size()
        self.group = None
        if self.world > 1:
            import torch.distributed as tdist

            dist.get_accelerator()  # the process group
            self.group = tdist.new_group(backend="gloo", timeout=_WAIT_TIMEOUT)

    def wait(self) -> None:
        if self.group is not None:
            import torch.distributed as tdist

            tdist.barrier(group=self.group)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the main process while the others wait; its result on main, None elsewhere."""
        result = fn() if dist.is_main() else None
        self.wait()
        return result


class _SingleProcess:
    """The barrier of a stage run alone in one process (tests, library use): nothing to wait for."""
    world = 1
    group = None

    def wait(self) -> None:
        return None

    def on_main(self, fn: Callable[[], Any]) -> Any:
        return fn()


@dataclass
class StageContext:
    hooks: Hooks = field(default_factory=Hooks)
    barrier: Barrier | _SingleProcess = field(default_factory=_SingleProcess)
