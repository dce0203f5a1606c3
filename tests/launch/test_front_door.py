"""What a new user meets first: `--help` that documents every option, checks that refuse a doomed run
before its first stage (world size, WordNet, group sizes), `--dry-run`, and the continue command."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest
import yaml

from selfrank.launch.cli import _parser, continue_command, main

REPO = Path(__file__).resolve().parents[2]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_of_every_command_is_documented():
    commands = _subparsers()
    assert set(commands) == {"rank", "sft", "sample", "reward", "ppo", "eval", "run", "experiment", "slurm"}
    for name, parser in commands.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 10, f"{name} {action.dest}: no help"
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert flag in text, f"{name}: {flag} missing from --help"
    for name in ("run", "sft", "ppo", "eval"):
        text = " ".join(commands[name].format_help().split())
        assert "runs/" in text and "--set name=" in text and "report" in text  # where results go; variants apart
    rank = " ".join(commands["rank"].format_help().split())
    for field in ("scores", "order", "clusters", "representatives", "pairs", "noise", "kept"):
        assert field in rank


def _config(tmp_path: Path, **sections) -> Path:
    data = {"name": "door", "output_dir": str(tmp_path / "runs"), **sections}
    path = tmp_path / "door.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _refused(capsys, args: list[str], fragment: str, tmp_path: Path) -> None:
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("selfrank: error: ") and fragment in err[0], err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


@pytest.mark.parametrize("world, sections, fragment", [
    (3, {}, "sft.batch_size: 32 examples cannot be split evenly across 3 processes"),
    (4, {"sft": {"batch_size": 8, "grad_accum": 4}}, "sft.grad_accum: 2 examples per process"),
    (4, {"ppo": {"batch_size": 4, "minibatches": 2}}, "ppo.minibatches: minibatches of 2 episodes"),
    (2, {"ppo": {"batch_size": 3, "minibatches": 1}}, "ppo.batch_size: 3 prompts"),
])
def test_batch_layouts_are_checked_for_the_world_size_before_any_stage(world, sections, fragment, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))  # what a launcher sets for each of its processes
    _refused(capsys, ["run", str(_config(tmp_path, **sections))], fragment, tmp_path)


def test_slurm_checks_the_jobs_world_size(tmp_path, capsys):
    config = _config(tmp_path, ppo={"batch_size": 16, "minibatches": 2})
    _refused(capsys, ["slurm", str(config), "--nodes", "2", "--gpus-per-node", "8"],
             "minibatches of 8 episodes cannot be split evenly across 16 processes", tmp_path)
    assert main(["slurm", str(config), "--nodes", "2", "--gpus-per-node", "8", "--set", "ppo.batch_size=32"]) == 0
    script = (tmp_path / "runs" / "door" / "job.sbatch").read_text()
    assert "--set ppo.batch_size=32" in script


def test_the_online_variants_groups_must_be_larger_than_the_pair_interval(tmp_path, capsys):
    config = _config(tmp_path, variants=["str", "str_online"], ranking={"pairs": {"interval": 2}},
                     ppo={"samples_per_prompt": 2, "online_rm_every": 1, "batch_size": 4})
    _refused(capsys, ["run", str(config)], "ranks PPO's 2 answers per prompt", tmp_path)


def test_missing_wordnet_is_found_before_any_stage(tmp_path, capsys, monkeypatch):
    import nltk

    from selfrank.train.evaluation.metrics import require_wordnet

    empty = tmp_path / "no-nltk-data"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [str(empty)])
    require_wordnet.cache_clear()
    try:
        config = str(_config(tmp_path))
        _refused(capsys, ["run", config], "METEOR needs WordNet", tmp_path)
        # Without the eval stage, WordNet is not needed.
        assert main(["sft", config, "--dry-run"]) == 0
        assert "sft: run (not run yet)" in capsys.readouterr().out
    finally:
        require_wordnet.cache_clear()


def test_dry_run_says_what_each_stage_would_do_and_writes_nothing(tmp_path, capsys):
    assert main(["run", str(_config(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:5] == [f"{s}: run (not run yet)" for s in ("sft", "sample", "reward", "ppo", "eval")]
    assert out[-1].startswith("checks passed; nothing was run")
    assert not (tmp_path / "runs").exists()


def test_the_continue_command_is_the_same_command_with_resume():
    line = continue_command(["run", "my configs/demo.yaml", "--set", "ppo.steps=50"])
    assert shlex.split(line)[-5:] == ["run", "my configs/demo.yaml", "--set", "ppo.steps=50", "--resume"]
    assert continue_command(["ppo", "c.yaml", "--resume"]).endswith("ppo c.yaml --resume")
