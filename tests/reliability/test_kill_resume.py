"""SIGKILL at seeded random moments inside every stage, then ``--resume``: the final weights and
the report's numbers equal an uninterrupted run's exactly (CPU, fixed seed)."""
from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from tests.reliability.helpers import assert_same_weights, kill, report_numbers, run, start, wait_for, write_config

STAGES = ("sft", "sample", "reward", "ppo", "eval")

# Where to kill: (the stage it should land in, a file whose appearance means that stage is under way).
KILL_POINTS = [
    ("sft", "sft/original/config.json"),          # before the first SFT checkpoint: restart from scratch
    ("sft", "sft/checkpoint/checksums.json"),    # after one: continue from it
    ("sample", "sample/progress.0.jsonl"),        # some groups ranked
    ("reward", "reward/str/checkpoint/checksums.json"),
    ("ppo", "ppo/str/log.jsonl"),
    ("eval", "eval/generations_original.jsonl"),
]


def _running_stage(root: Path) -> str | None:
    return next((s for s in STAGES if not (root / s / "DONE.json").is_file()), None)


@pytest.mark.slow
def test_sigkill_in_every_stage_then_resume_matches_an_uninterrupted_run(tmp_path, reference_run):
    config = write_config(tmp_path, "chain")
    root = tmp_path / "runs" / "chain"
    rng = random.Random(1234)
    landed = []
    for stage, marker in KILL_POINTS:
        process = start(["run", str(config), "--resume"], cwd=tmp_path, log=tmp_path / "chain.log")
        if not wait_for(lambda: (root / marker).exists(), process):
            pytest.fail(f"run ended (code {process.returncode}) before {marker} appeared; see {tmp_path / 'chain.log'}")
        time.sleep(rng.uniform(0.0, 0.05))  # a seeded random moment shortly after the stage got under way
        landed.append((stage, _running_stage(root)))
        code = kill(process, signal.SIGKILL)
        assert code == -signal.SIGKILL, (stage, code)
    result = run(["run", str(config), "--resume"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [want for want, got in landed if want != got] == [], landed

    assert_same_weights(root / "sft" / "model", reference_run / "sft" / "model")
    assert_same_weights(root / "reward" / "str" / "model", reference_run / "reward" / "str" / "model")
    assert_same_weights(root / "ppo" / "str" / "actor", reference_run / "ppo" / "str" / "actor")
    ours, theirs = report_numbers(root / "eval" / "report.json"), report_numbers(reference_run / "eval" / "report.json")
    assert ours and ours == theirs
    assert not list(root.rglob("*.tmp")) and not list(root.rglob(".*.tmp-*"))
