"""The progress module: a log line every N steps (with metrics, step time and ETA) when stderr is not a
terminal, a bar when it is, nothing on other processes, and "where the run is" for interrupt messages."""
from __future__ import annotations

import logging

import pytest

from selfrank.train import progress
from selfrank.train.progress import StepProgress, default_every, format_duration, where


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="selfrank.train.progress")

    def read() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "selfrank.train.progress"]
    return read


def test_log_lines_every_n_steps_with_metrics_and_eta(lines):
    bar = StepProgress("ppo str", 10, every=4, enabled=True, terminal=False)
    for step in bar:
        bar.set_postfix(reward=0.5 + step, kl="0.010")
    got = lines()
    # the first step (the rate shows early), every 4th, and the last
    assert [line.split(":")[1].split("(")[0].strip() for line in got] == ["step 1/10", "step 4/10", "step 8/10",
                                                                           "step 10/10"]
    assert got[0].startswith("ppo str: step 1/10 (10%) reward 0.5 kl 0.010 | ")
    assert "s/step | ETA " in got[1] and got[-1].endswith("ETA 0s")
    assert where().get("loop") != "ppo str"  # a loop that ran out is closed


def test_resumed_loop_counts_from_its_start_and_update_drives_it(lines):
    bar = StepProgress("sft full", 6, initial=4, every=100, enabled=True, terminal=False)
    bar.update(1)
    bar.set_postfix(loss=1.25)
    bar.update(1)
    bar.close()
    assert [line.split(" |")[0] for line in lines()] == ["sft full: step 5/6 (83%)", "sft full: step 6/6 (100%) loss 1.25"]


def test_other_processes_and_terminals_log_no_lines(lines, capsys):
    for step in StepProgress("quiet", 5, enabled=False, terminal=False):
        pass
    for step in StepProgress("bar", 5, every=1, enabled=True, terminal=True):
        pass
    assert lines() == []
    assert "bar: 100%" in capsys.readouterr().err  # the terminal gets a bar instead


def test_where_names_the_stage_and_the_innermost_open_loop():
    progress.set_stage("ppo")
    try:
        outer = StepProgress("eval rows", 3, enabled=False)
        inner = StepProgress("eval sft", 8, enabled=False)
        inner.update(5)
        assert where() == {"stage": "ppo", "loop": "eval sft", "done": 5, "total": 8, "unit": "step"}
        inner.close()
        assert where()["loop"] == "eval rows"
        outer.close()
    finally:
        progress.set_stage(None)
    assert "stage" not in where()


def test_a_loop_left_by_an_exception_stays_where_the_run_is():
    bar = StepProgress("reward (pairwise)", 9, enabled=False)
    with pytest.raises(KeyboardInterrupt):
        for step in bar:
            if step == 3:
                raise KeyboardInterrupt
    assert where()["loop"] == "reward (pairwise)" and where()["done"] == 3
    bar.close()


def test_helpers():
    assert default_every(150) == 8 and default_every(7) == 1 and default_every(0) == 1
    assert format_duration(42) == "42s" and format_duration(185) == "3m 05s" and format_duration(7620) == "2h 07m"
    with pytest.raises(ValueError):
        StepProgress("x", 3, every=0, enabled=False)
