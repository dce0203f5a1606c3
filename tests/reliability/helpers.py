"""Shared pieces of the reliability tests: a tiny experiment YAML, `selfrank` subprocesses, exact
comparisons of weights and report numbers."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from selfrank.ranking.config import EmbedderConfig, RankingConfig
from selfrank.train.config import PPOConfig, RewardConfig, SampleConfig, SFTConfig, TrackingConfig
from tests.train.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
SELFRANK = [sys.executable, "-c", "import sys; from selfrank.launch.cli import main; sys.exit(main())"]
FAKE_SECRETS = {"WANDB_API_KEY": "wandbfake" + "0" * 31, "HF_TOKEN": "hf_fakeTOKENfakeTOKENfakeTOKEN1234"}


def write_config(folder: Path, name: str, **changes) -> Path:
    """A tiny experiment as YAML: the test sizes, one variant, checkpoints often enough to kill between."""
    config = tiny_config(folder / "runs", name=name,
                         sft=SFTConfig(lr=1e-3, batch_size=8, max_steps=12, block_size=64, save_every=3),
                         sample=SampleConfig(samples_per_prompt=4, max_new_tokens=8, max_prompts=16, batch_size=4, async_ranking=False),
                         ranking=RankingConfig(embedder=EmbedderConfig(name="lexical", lexical_dim=256)),
                         reward=RewardConfig(batch_size=4, max_steps=4, max_length=64, save_every=2),
                         ppo=PPOConfig(steps=2, batch_size=4, minibatches=2, ppo_epochs=1, max_new_tokens=8,
                                       save_every=1),
                         tracking=TrackingConfig(wandb="offline"))
    config.variants = ["str"]
    data = dataclasses.asdict(config)
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def env(**extra) -> dict:
    out = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    out.pop("PYTHONSTARTUP", None)
    return out


def start(args: list[str], cwd: Path, log: Path, preexec_fn=None, program: list[str] = SELFRANK,
          **extra_env) -> subprocess.Popen:
    handle = open(log, "ab")
    return subprocess.Popen(program + args, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=env(**extra_env),
                            preexec_fn=preexec_fn)


def run(args: list[str], cwd: Path, timeout: float = 600, preexec_fn=None, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(SELFRANK + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env(**extra_env), preexec_fn=preexec_fn)


def wait_for(predicate, process: subprocess.Popen | None = None, timeout: float = 600.0, poll: float = 0.005) -> bool:
    """Poll until ``predicate()``; False when ``process`` exited first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(poll)
    return True


def kill(process: subprocess.Popen, signum: int = signal.SIGKILL) -> int:
    process.send_signal(signum)
    return process.wait(timeout=600)


def error_lines(stderr: str) -> list[str]:
    """The non-log lines of a CLI's stderr (log lines start with a HH:MM:SS time stamp)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not (len(line) > 8 and line[2] == ":" and line[5] == ":" and line[:2].isdigit())
            and "[real_accelerator.py" not in line]


def tensors(folder: Path) -> dict[str, "object"]:
    """Every tensor of every safetensors file in ``folder``, keyed ``file/name``."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            out[f"{path.name}/{key}"] = value
    assert out, f"no safetensors weights in {folder}"
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not (ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
                                       and bool((ta[k] == tb[k]).all()))]
    assert not different, f"{a} vs {b}: tensors differ: {different[:5]}"


def report_numbers(path: Path) -> dict[str, float]:
    """Every number of a report.json by its key path (strings such as model paths left out, and the
    stages' wall times, which no two runs share)."""
    out = {}

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if where == "" and key == "stage_seconds":
                    continue
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[where] = node

    walk(json.loads(Path(path).read_text()), "")
    return out
