"""Ctrl-C and forgotten flags, through the CLI entry point with real signals: an interrupted stage says
where it stopped and the exact command that continues it; a rerun without --resume keeps the checkpoint
and says what to do; the printed command continues the run."""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
from pathlib import Path

import pytest
import yaml

from selfrank.launch.cli import main
from selfrank.train import signals
from selfrank.train.pipeline import run_pipeline
from tests.train.helpers import signal_during_ppo_update, tiny_config


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    signals.reset()
    signals.set_stops_at_steps(False)


def _prepared_run(tmp_path: Path, stages: list[str], **ppo) -> Path:
    """A tiny run with ``stages`` complete, and its config as a YAML for the CLI."""
    config = tiny_config(tmp_path / "runs", name="cc")
    config.variants = ["str"]
    for key, value in ppo.items():
        setattr(config.ppo, key, value)
    run_pipeline(config, stages)
    import dataclasses

    path = tmp_path / "cc.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    return path


def _one_error_line(err: str, prefix: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _continue_argv(message: str) -> list[str]:
    command = shlex.split(message.split("continue with: ", 1)[1])
    assert command[:3] == ["python", "-m", "selfrank"], command
    return command[3:]


def _log_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_ctrl_c_in_ppo_checkpoints_names_the_step_and_the_command_that_continues(tmp_path, capsys, caplog, monkeypatch,
                                                                                 restore_signals):
    caplog.set_level(logging.INFO)
    config = _prepared_run(tmp_path, ["sft", "sample", "reward"], steps=6, save_every=100)
    root = tmp_path / "runs" / "cc"
    signal_during_ppo_update(monkeypatch, signal.SIGINT, update=2)  # Ctrl-C arrives while step 2 trains
    assert main(["run", str(config)]) == 130
    err = capsys.readouterr().err
    assert "Ctrl-C: stopping at the next step boundary with a checkpoint" in err
    message = _one_error_line(err, "selfrank: ppo")
    checkpoint = root / "ppo" / "str" / "checkpoint"
    assert message.startswith(f"selfrank: ppo stopped by SIGINT after 2 steps; progress saved in {checkpoint}; ")
    assert _continue_argv(message) == ["run", str(config), "--resume"]
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2
    monkeypatch.undo()
    signals.reset()

    # Forgetting --resume: refused before anything runs, the checkpoint kept, both ways forward named.
    saved = (checkpoint / "state.json").read_bytes()
    assert main(["run", str(config)]) == 2
    line = _one_error_line(capsys.readouterr().err, "selfrank: error:")
    assert "ppo (a checkpoint at step 2 in ppo/str/checkpoint)" in line and "--resume" in line and "--force" in line
    assert (checkpoint / "state.json").read_bytes() == saved

    # The printed command continues where the run stopped and ends by naming the report.
    assert main(_continue_argv(message)) == 0
    out = capsys.readouterr()
    assert "ppo: resuming after step 2 of 6" in caplog.text
    assert _log_steps(root / "ppo" / "str" / "log.jsonl") == [1, 2, 3, 4, 5, 6]
    assert out.out.strip().splitlines()[-1] == f"report: {root / 'eval' / 'report.md'}"

    # Replacing the finished PPO (--force), interrupted: the finished stage stays as it was, the replacement
    # keeps its checkpoint beside it, and the printed command (with --force --resume) completes the swap.
    finished = {p.name: p.read_bytes() for p in (root / "ppo" / "str").iterdir() if p.is_file()}
    signal_during_ppo_update(monkeypatch, signal.SIGINT, update=2)
    assert main(["run", str(config), "--set", "ppo.steps=8", "--force"]) == 130
    message = _one_error_line(capsys.readouterr().err, "selfrank: ppo")
    assert f"progress saved in {root / 'ppo.new' / 'str' / 'checkpoint'}" in message
    assert _continue_argv(message) == ["run", str(config), "--set", "ppo.steps=8", "--force", "--resume"]
    assert {p.name: p.read_bytes() for p in (root / "ppo" / "str").iterdir() if p.is_file()} == finished
    monkeypatch.undo()
    signals.reset()
    assert main(_continue_argv(message)) == 0
    assert _log_steps(root / "ppo" / "str" / "log.jsonl") == list(range(1, 9))
    assert not (root / "ppo.new").exists() and json.loads((root / "ppo" / "DONE.json").read_text())[
        "settings"]["ppo"]["steps"] == 8


def test_ctrl_c_in_eval_stops_at_once_and_says_what_is_kept(tmp_path, capsys, monkeypatch, restore_signals):
    config = _prepared_run(tmp_path, ["sft", "sample", "reward", "ppo"])
    root = tmp_path / "runs" / "cc"
    import selfrank.train.evaluation.evaluate as evaluate

    real_score = evaluate.score_examples

    def ctrl_c_while_scoring(*args, **kwargs):  # eval has no step boundary: the first Ctrl-C stops it
        os.kill(os.getpid(), signal.SIGINT)
        return real_score(*args, **kwargs)

    monkeypatch.setattr(evaluate, "score_examples", ctrl_c_while_scoring)
    assert main(["eval", str(config)]) == 130
    message = _one_error_line(capsys.readouterr().err, "selfrank: interrupted")
    assert message.startswith("selfrank: interrupted in eval (eval rows at row 0/")
    assert "eval keeps no checkpoint yet, so it starts over" in message
    assert _continue_argv(message) == ["eval", str(config), "--resume"]
    assert not (root / "eval" / "DONE.json").exists()
    monkeypatch.undo()
    assert main(_continue_argv(message)) == 0
    assert (root / "eval" / "DONE.json").is_file()
