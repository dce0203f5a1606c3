"""Security: weights only as safetensors, no unsafe loaders in the code, no secret in any output."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from selfrank.errors import UserError
from selfrank.train.rundir import RunDir

from tests.reliability.helpers import FAKE_SECRETS, REPO

CODE_DIRS = ("ranking", "train", "launch", "bench", "tests", "scripts")
FORBIDDEN = {
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "yaml.load": re.compile(r"\byaml\.(load|unsafe_load)\s*\("),
    "pickle.load": re.compile(r"\bpickle\.loads?\s*\("),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "shell=True": re.compile(r"shell\s*=\s*True"),
}


def _python_files() -> list[Path]:
    files = [p for d in CODE_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py")]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def test_static_scan_finds_no_unsafe_call():
    files = _python_files()
    assert len(files) > 30
    hits = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for what, pattern in FORBIDDEN.items():
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                hits.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert hits == []


def test_scan_patterns_catch_what_they_are_meant_to():
    bad = ['torch.load(path)', 'torch.load(p, map_location="cpu")', "yaml.load(text)", "yaml.unsafe_load(t)",
           "pickle.load(f)", "from_pretrained(n, trust_remote_code=True)", "run(cmd, shell=True)"]
    good = ['torch.load(p, weights_only=True)', "yaml.safe_load(t)", "trust_remote_code=cfg.trust_remote_code"]
    assert all(any(p.search(b) for p in FORBIDDEN.values()) for b in bad)
    assert not any(p.search(g) for g in good for p in FORBIDDEN.values())


@pytest.mark.slow
def test_run_outputs_hold_only_safetensors_weights_and_no_secret(reference_run):
    files = [p for p in reference_run.parent.parent.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5")]
    assert any(p.suffix == ".safetensors" for p in weights)
    pickled = [p for p in weights if p.suffix != ".safetensors"]
    # Pickle-format files are only optimiser / RNG / trainer state inside checkpoints, and they load
    # with weights_only=True (no code runs).
    for path in pickled:
        assert "checkpoint" in path.parent.name and path.suffix == ".pt", path
        torch.load(path, weights_only=True)
    # Secrets from the environment appear in no output: run folder, config copy, report, logs, W&B files.
    leaks = [(str(p), name) for p in files for name, value in FAKE_SECRETS.items() if value.encode() in p.read_bytes()]
    assert leaks == []
    assert (reference_run / "config.yaml").is_file() and (reference_run / "eval" / "report.json").is_file()


def test_output_paths_are_confined_to_the_run_folder(tmp_path):
    run = RunDir(tmp_path / "runs" / "x")
    run.root.mkdir(parents=True)
    assert run.confined("eval/report.md") == (run.root / "eval" / "report.md").resolve()
    (tmp_path / "outside").mkdir()
    (run.root / "link").symlink_to(tmp_path / "outside")
    for escape in ("../y", "/etc/passwd", "eval/../../y", "link/file"):
        with pytest.raises(UserError, match="escapes the run folder"):
            run.confined(escape)
