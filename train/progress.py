"""Progress of a long loop, visible wherever the job runs.

On the main process a loop shows a progress bar when stderr is a terminal, and otherwise (a batch job,
a log file, ``make`` piped to ``tee``) logs one line every ``every`` steps (and at the first and last
one) with the loop's latest metrics, the mean step time since the previous line and the time left::

    ppo str: step 40/150 (27%) reward 0.123 kl 0.045 | 1.2 s/step | ETA 2m 12s

Other processes show nothing. The object behaves like the part of ``tqdm`` the stages use (iterate
it, ``update``, ``set_postfix``, ``close``), so a stage swaps one constructor for another.

The innermost open loop is also "where the run is" (:func:`where`), which the CLI names when a run
is interrupted.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

# Log lines per loop when stderr is not a terminal (every 5% of the steps).
LINES_PER_LOOP = 20

_open: list["StepProgress"] = []  # loops under way, innermost last
_stage: str | None = None  # the pipeline stage under way


def default_every(total: int) -> int:
    """Steps between two log lines: about :data:`LINES_PER_LOOP` lines per loop, at least every step."""
    return max(1, math.ceil(total / LINES_PER_LOOP)) if total > 0 else 1


def format_duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``2h 07m``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _is_main() -> bool:
    from selfrank.train import dist

    return dist.is_main()


class StepProgress:
    """A loop over steps ``initial .. total - 1`` (or over ``iterable``) with visible progress.

    ``enabled``: whether this process reports (default: the main process only). ``every``: steps
    between log lines when stderr is not a terminal (default :func:`default_every`). ``terminal``:
    whether stderr is a terminal (default: asked of ``sys.stderr``)."""

    def __init__(self, label: str, total: int, initial: int = 0, *, iterable: Iterable | None = None,
                 unit: str = "step", every: int | None = None, enabled: bool | None = None,
                 terminal: bool | None = None):
        self.label = label
        self.total = int(total)
        self.initial = int(initial)
        self.done = int(initial)
        self.unit = unit
        self.every = every if every is not None else default_every(self.total)
        if self.every < 1:
            raise ValueError(f"every: must be >= 1, got {self.every}")
        self._iterable = iterable
        self._metrics: dict[str, Any] = {}
        self._enabled = _is_main() if enabled is None else enabled
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bar = None
        if self._enabled and terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, desc=label, unit=unit, dynamic_ncols=True)
        self._log_lines = self._enabled and not terminal
        self._started = time.perf_counter()
        self._last_line = (self.initial, self._started)  # (steps done, time) at the previous log line
        self._closed = False
        _open.append(self)

    # ---- the tqdm-like surface -------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        items = self._iterable if self._iterable is not None else range(self.initial, self.total)
        for item in items:
            yield item
            self.update(1)  # the body finished: one more step done
        # Closed only when the loop ran out: a loop left by an exception stays "where the run is".
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._log_lines and self._due():
            self._log_line()

    def set_postfix(self, **metrics: Any) -> None:
        """The loop's latest metrics (shown on the bar, and in the next log line)."""
        self._metrics.update(metrics)
        if self._bar is not None:
            self._bar.set_postfix({k: _format_value(v) for k, v in metrics.items()}, refresh=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._log_lines and self._last_line[0] != self.done and self.done > self.initial:
            self._log_line()
        if self in _open:
            _open.remove(self)

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- log lines -------------------------------------------------------------------------------
    def _due(self) -> bool:
        step = self.done
        return step == self.initial + 1 or step == self.total or step % self.every == 0

    def line(self, now: float | None = None) -> str:
        """The log line for the current position."""
        now = time.perf_counter() if now is None else now
        parts = [f"{self.label}: {self.unit} {self.done}/{self.total}"]
        if self.total > 0:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts += [f"{key} {_format_value(value)}" for key, value in self._metrics.items()]
        text = " ".join(parts)
        since_steps, since_time = self._last_line
        if self.done > since_steps:
            per_step = (now - since_time) / (self.done - since_steps)
            overall = (now - self._started) / max(1, self.done - self.initial)
            text += f" | {per_step:.3g} s/{self.unit} | ETA {format_duration(overall * (self.total - self.done))}"
        return text

    def _log_line(self) -> None:
        now = time.perf_counter()
        log.info("%s", self.line(now))
        self._last_line = (self.done, now)


def set_stage(stage: str | None) -> None:
    """Record the pipeline stage under way (None when none is)."""
    global _stage
    _stage = stage


def where() -> dict:
    """Where the run is: ``stage`` (pipeline stage), and of the innermost open loop ``loop`` (its
    label), ``done`` and ``total`` steps; keys are absent when unknown."""
    out: dict = {}
    if _stage is not None:
        out["stage"] = _stage
    if _open:
        inner = _open[-1]
        out.update(loop=inner.label, done=inner.done, total=inner.total, unit=inner.unit)
    return out
