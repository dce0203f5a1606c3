"""SIGKILL at seeded random points inside every stage, then ``--resume``: the final weights and
the report's numbers equal an uninterrupted run's exactly (CPU, fixed seed).

A point is a seeded number of progress points (file operations, step boundaries) after a marker
file appears: the process stops itself there (``stop_at``) and is killed while stopped, so where
each kill lands does not depend on the speed of the machine."""
from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from tests.reliability.helpers import assert_same_weights, kill, report_numbers, run, start, wait_for, write_config
from tests.reliability.stop_at import command, is_stopped

STAGES = ("sft", "sample", "reward", "ppo", "eval")

# Where to kill: (the stage it should land in, a file whose appearance means that stage is under way).
# The kill comes a seeded number (below POINTS_AFTER) of progress points after the file appeared.
KILL_POINTS = [
    ("sft", "sft/original/config.json"),          # before the first SFT checkpoint: restart from scratch
    ("sft", "sft/checkpoint/checksums.json"),    # after one: continue from it
    ("sample", "sample/progress.0.jsonl"),        # some groups ranked
    ("reward", "reward/str/checkpoint/checksums.json"),
    ("ppo", "ppo/str/log.jsonl"),
    ("eval", "eval/generations_original.jsonl"),
]
POINTS_AFTER = 12


def _temporaries(root: Path) -> list[Path]:
    # Atomic files and folders (``.*.tmp``, ``.*.tmp-*``) and checkpoints being written (``<folder>.new``).
    return list(root.rglob("*.tmp")) + list(root.rglob(".*.tmp-*")) + list(root.rglob("*.new"))


def _running_stage(root: Path) -> str | None:
    return next((s for s in STAGES if not (root / s / "DONE.json").is_file()), None)


@pytest.mark.slow
def test_sigkill_in_every_stage_then_resume_matches_an_uninterrupted_run(tmp_path, reference_run):
    config = write_config(tmp_path, "chain")
    root = tmp_path / "runs" / "chain"
    rng = random.Random(1234)
    landed, left = [], []
    for stage, marker in KILL_POINTS:
        after = rng.randrange(POINTS_AFTER)  # a seeded random point shortly after the stage got under way
        process = start(["run", str(config), "--resume"], cwd=tmp_path, log=tmp_path / "chain.log",
                        program=command(root, root / marker, after))
        if not wait_for(lambda: is_stopped(process.pid), process):
            pytest.fail(f"run ended (code {process.returncode}) before point {after} after {marker}; "
                        f"see {tmp_path / 'chain.log'}")
        landed.append((stage, _running_stage(root)))
        code = kill(process, signal.SIGKILL)
        assert code == -signal.SIGKILL, (stage, code)
        left += _temporaries(root)
        print(f"killed {after} points after {marker}: in {landed[-1][1]}, leaving {[p.name for p in _temporaries(root)]}")
    assert left, "no kill landed inside an atomic write: the clean-up on resume went untested"
    result = run(["run", str(config), "--resume"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [want for want, got in landed if want != got] == [], landed

    assert_same_weights(root / "sft" / "model", reference_run / "sft" / "model")
    assert_same_weights(root / "reward" / "str" / "model", reference_run / "reward" / "str" / "model")
    assert_same_weights(root / "ppo" / "str" / "actor", reference_run / "ppo" / "str" / "actor")
    ours, theirs = report_numbers(root / "eval" / "report.json"), report_numbers(reference_run / "eval" / "report.json")
    assert ours and ours == theirs
    assert _temporaries(root) == []
