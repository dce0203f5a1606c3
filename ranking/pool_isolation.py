"""Whom the ranking pool blames when a worker dies, and how it finds out.

A worker can die because of a group it holds (a crash in native code, a group that blows up memory
and draws the OOM killer) or for a reason of its own (killed from outside, the OOM killer picking it
while another process hogs memory). Its exit code cannot tell the two apart, so the pool blames a
group only for what it can prove:

* a worker that dies holding several groups proves nothing about any one of them: each becomes a
  *suspect* and none is charged;
* a suspect is only ever ranked alone (one group per task), so the next death that happens while
  it is held is its own;
* a worker that dies holding one group charges that group with a *solo death*;
* a group is failed only once it has ``max_solo_deaths`` solo deaths.

So a group that shared a batch with a poison group always completes (it is re-run alone), and so
does a group whose worker was killed from outside, unless workers running it alone are killed
``max_solo_deaths`` times in a row. Every group dies at most once in a batch and at most
``max_solo_deaths`` times alone: a poison group costs ``max_solo_deaths`` (+1 if it came in a batch)
worker restarts, never an endless loop.
"""
from __future__ import annotations

from collections import deque
from typing import Protocol, Sequence, TypeVar


class Suspicion(Protocol):
    suspect: bool  # was held by a worker that died: ranked alone from now on
    solo_deaths: int  # workers that died while holding this group alone


T = TypeVar("T", bound=Suspicion)


def blame_death(held: Sequence[Suspicion], max_solo_deaths: int) -> list[bool]:
    """Record that a worker died holding ``held`` (its unanswered groups); for each group, whether
    it is now to be failed (True) rather than ranked again, alone."""
    alone = len(held) == 1
    verdicts = []
    for record in held:
        record.suspect = True
        if alone:
            record.solo_deaths += 1
        verdicts.append(alone and record.solo_deaths >= max_solo_deaths)
    return verdicts


def take_batch(pending: deque[T], size: int) -> list[T]:
    """Pop the next batch from the front of ``pending``: a suspect alone, else up to ``size``
    consecutive groups that are not suspects."""
    batch = [pending.popleft()]
    if not batch[0].suspect:
        while len(batch) < size and pending and not pending[0].suspect:
            batch.append(pending.popleft())
    return batch
