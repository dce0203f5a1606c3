"""The pool's blame rule on its own: who is charged when a worker dies, and who runs alone."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from selfrank.ranking.pool_isolation import blame_death, take_batch


@dataclass
class Group:
    name: str
    suspect: bool = False
    solo_deaths: int = 0


def test_a_death_in_a_batch_charges_nobody_and_makes_everyone_a_suspect():
    held = [Group("a"), Group("b"), Group("c")]
    assert blame_death(held, max_solo_deaths=1) == [False, False, False]
    assert all(g.suspect and g.solo_deaths == 0 for g in held)


def test_a_group_fails_only_at_its_max_solo_deaths():
    group = Group("p")
    blame_death([group, Group("q")], max_solo_deaths=2)  # its batch died: no charge
    assert blame_death([group], max_solo_deaths=2) == [False]
    assert group.solo_deaths == 1
    assert blame_death([group], max_solo_deaths=2) == [True]
    assert group.solo_deaths == 2


def test_a_death_alone_counts_even_for_a_group_never_suspected():
    group = Group("lone")
    assert blame_death([group], max_solo_deaths=1) == [True]
    assert group.suspect and group.solo_deaths == 1


def test_suspects_go_alone_and_batches_stop_at_a_suspect():
    pending = deque([Group("s1", suspect=True), Group("a"), Group("b"), Group("s2", suspect=True), Group("c"),
                     Group("d"), Group("e")])
    batches = []
    while pending:
        batches.append([g.name for g in take_batch(pending, size=2)])
    assert batches == [["s1"], ["a", "b"], ["s2"], ["c", "d"], ["e"]]
