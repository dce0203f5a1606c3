"""Graceful preemption (SIGTERM -> checkpoint, exit 143 -> --resume finishes exactly), and what a
resumed stage does with a full disk or a corrupted checkpoint."""
from __future__ import annotations

import json
import resource
import shutil
import signal
from pathlib import Path

import pytest

from selfrank.train.checkpoint import find_checkpoint, verify_checkpoint
from selfrank.train.signals import EXIT_CODE

from tests.reliability.helpers import assert_same_weights, error_lines, run, start, write_config
from tests.reliability.stop_at import command, signal_when_stopped

FILE_LIMIT = 60_000  # bytes: below the tiny model's weights, above every JSON file the stages write


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigterm_mid_sft_checkpoints_exits_143_and_resume_matches(tmp_path, reference_run):
    config = write_config(tmp_path, "pre")
    root = tmp_path / "runs" / "pre"
    # SIGTERM at the first progress point after the periodic checkpoint at step 3 (not at a moment:
    # a fast machine could finish all 12 steps first).
    process = start(["sft", str(config)], cwd=tmp_path, log=tmp_path / "sft.log",
                    program=command(root, root / "sft" / "checkpoint" / "state.json", 0))
    code = signal_when_stopped(process, signal.SIGTERM)
    log = (tmp_path / "sft.log").read_text()
    assert code == EXIT_CODE == 143, log[-2000:]
    assert "Traceback" not in log
    (message,) = [line for line in error_lines(log) if line.startswith("selfrank:")]
    assert "SIGTERM" in message and "--resume" in message
    step = json.loads((root / "sft" / "checkpoint" / "state.json").read_text())["step"]
    assert 3 <= step < 12, step  # stopped mid-training, past the periodic checkpoint at step 3
    assert not (root / "sft" / "DONE.json").exists() and not (root / "sft" / "model").exists()

    result = run(["sft", str(config), "--resume"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {step}/12" in result.stderr
    assert_same_weights(root / "sft" / "model", reference_run / "sft" / "model")
    assert not (root / "sft" / "checkpoint").exists()


@pytest.mark.slow
def test_reward_preempted_then_disk_full_then_corrupted_checkpoint(tmp_path, reference_run):
    config = write_config(tmp_path, "rw")
    root = tmp_path / "runs" / "rw"
    root.mkdir(parents=True)
    for stage in ("sft", "sample"):  # the completed earlier stages of the reference run
        shutil.copytree(reference_run / stage, root / stage)
    before = _files(root)
    checkpoint = root / "reward" / "str" / "checkpoint"

    # 1. SIGTERM as soon as the stage starts: the loop stops at its first step boundary with a checkpoint.
    process = start(["reward", str(config)], cwd=tmp_path, log=tmp_path / "reward.log",
                    program=command(root, root / "reward" / "str", 0))
    assert signal_when_stopped(process, signal.SIGTERM) == 143
    assert "Traceback" not in (tmp_path / "reward.log").read_text()
    verify_checkpoint(find_checkpoint(checkpoint))
    saved = _files(checkpoint)

    # 2. Resume with a file size limit: the next write of weights fails. One clear line, no traceback;
    #    the earlier stages and the checkpoint are untouched and no temporary file is left behind.
    result = run(["reward", str(config), "--resume"], cwd=tmp_path, preexec_fn=_limit_file_size)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith("selfrank: error: disk full while writing ") and str(root / "reward" / "str") in line
    assert "File too large" in line
    assert {k: v for k, v in _files(root).items() if k in before} == before
    verify_checkpoint(find_checkpoint(checkpoint))
    assert _files(checkpoint) == saved or json.loads((checkpoint / "state.json").read_text())["step"] > 0
    leftovers = [p for p in root.rglob("*") if p.name.endswith((".tmp", ".new")) or ".tmp-" in p.name]
    assert leftovers == []
    assert not (root / "reward" / "DONE.json").exists() and not (root / "reward" / "str" / "model").exists()

    # 3. A truncated checkpoint file: --resume refuses it with one line naming the file (exit 2).
    weights = checkpoint / "reward_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run(["reward", str(config), "--resume"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith("selfrank: error: ") and "reward_model.safetensors" in line and "corrupted" in line
