"""Bad configs and arguments: every case exits with code 2, one line naming the field, no traceback,
and writes nothing (no run folder)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfrank.launch.cli import main

# (case id, YAML text, a fragment the one-line error must contain)
CONFIG_CASES = [
    ("unknown-top-key", "sampel: {samples_per_prompt: 4}\n", "did you mean 'sample'"),
    ("unknown-nested-key", "ppo: {stepz: 3}\n", "did you mean 'steps'"),
    ("unknown-deep-key", "ranking: {textrank: {dampng: 0.8}}\n", "ranking.textrank.dampng"),
    ("wrong-type-int", "sample: {samples_per_prompt: eight}\n", "sample.samples_per_prompt"),
    ("wrong-type-bool", "sample: {async_ranking: maybe}\n", "sample.async_ranking"),
    ("wrong-type-section", "ppo: 3\n", "ppo"),
    ("wrong-type-list", "variants: str\n", "variants"),
    ("k-below-2", "sample: {samples_per_prompt: 1}\n", "sample.samples_per_prompt"),
    ("interval-ge-k", "sample: {samples_per_prompt: 4}\nranking: {pairs: {interval: 4}}\n", "ranking.pairs.interval"),
    ("interval-zero", "ranking: {pairs: {interval: 0}}\n", "ranking.pairs.interval"),
    ("top-p-zero", "sample: {top_p: 0}\n", "sample.top_p"),
    ("top-p-above-1", "sample: {top_p: 1.5}\n", "sample.top_p"),
    ("ppo-top-p", "ppo: {top_p: -0.1}\n", "ppo.top_p"),
    ("temperature-zero", "sample: {temperature: 0}\n", "sample.temperature"),
    ("max-new-tokens-over-context", "sample: {max_new_tokens: 300}\n", "sample.max_new_tokens"),
    ("negative-sft-lr", "sft: {lr: -1.0e-4}\n", "sft.lr"),
    ("negative-reward-lr", "reward: {lr: -3.0e-5}\n", "reward.lr"),
    ("negative-ppo-lr", "ppo: {lr: -1}\n", "ppo.lr"),
    ("negative-kl", "ppo: {kl_coef: -0.5}\n", "ppo.kl_coef"),
    ("gamma-above-1", "ppo: {gamma: 1.5}\n", "ppo.gamma"),
    ("minibatches-not-dividing", "ppo: {batch_size: 6, minibatches: 4}\n", "ppo.minibatches"),
    ("damping-1", "ranking: {textrank: {damping: 1.0}}\n", "ranking.textrank.damping"),
    ("similarity-unknown", "ranking: {textrank: {similarity: cosine2}}\n", "ranking.textrank.similarity"),
    ("split-variance-zero", "ranking: {isodata: {split_variance: 0}}\n", "ranking.isodata.split_variance"),
    ("noise-probability", "ranking: {noise: {probability: 2}}\n", "ranking.noise.probability"),
    ("sft-method", "sft: {method: qlora}\n", "sft.method"),
    ("sft-baseline", "sft: {baselines: [lora, prefix]}\n", "sft.baselines"),
    ("task-kind", "task: {kind: translation}\n", "task.kind"),
    ("qa-without-train", "task: {kind: qa}\n", "task.train"),
    ("tiny-heads", "model: {tiny: {n_embd: 30, n_head: 4}}\n", "model.tiny.n_embd"),
    ("dtype", "model: {dtype: int8}\n", "model.dtype"),
    ("mixed-precision", "model: {mixed_precision: fp8}\n", "model.mixed_precision"),
    ("attn-implementation", "model: {attn_implementation: flash}\n", "model.attn_implementation"),
    ("lr-schedule", "ppo: {lr_schedule: step}\n", "ppo.lr_schedule"),
    ("variant-unknown", "variants: [str, rlhf]\n", "variants"),
    ("direct-k-below-3", "variants: [str_direct]\nppo: {samples_per_prompt: 2}\n", "ppo.samples_per_prompt: must be >= 3"),
    ("variants-empty", "variants: []\n", "variants"),
    ("wandb-mode", "tracking: {wandb: sometimes}\n", "tracking.wandb"),
    ("confidence-1", "eval: {confidence: 1.0}\n", "eval.confidence"),
    ("name-escapes", "name: ../../etc\n", "name"),
    ("reward-loss", "reward: {loss: hinge}\n", "reward.loss"),
    ("reward-loss-is-the-variant", "reward: {loss: listwise}\n", "str_listwise in variants"),
    ("sample-k-renamed", "sample: {k: 4}\n", "renamed sample.samples_per_prompt"),
    ("nan-policy", "ppo: {nan_policy: ignore}\n", "ppo.nan_policy"),
    ("rollout-logprobs", "ppo: {rollout_logprobs: cached}\n", "ppo.rollout_logprobs"),
    ("ppo-sampler", "ppo: {sampler: beam}\n", "ppo.sampler"),
    ("sample-sampler", "sample: {sampler: beam}\n", "sample.sampler"),
    ("eval-sampler", "eval: {sampler: beam}\n", "eval.sampler"),
    ("eval-samples-zero", "eval: {samples_per_prompt: 0}\n", "eval.samples_per_prompt"),
    ("eval-greedy-several", "eval: {do_sample: false, samples_per_prompt: 4}\n", "eval.samples_per_prompt"),
    ("baseline-steps", "sft: {baseline_max_steps: 0}\n", "sft.baseline_max_steps"),
    ("nan", "ppo: {lr: .nan}\n", "ppo.lr: must be a finite number, got nan"),
    ("infinity", "sft: {lr: .inf}\n", "sft.lr: must be a finite number, got inf"),
    ("overflow-to-infinity", "reward: {lr: 1.0e999}\n", "reward.lr: must be a finite number, got inf"),
    ("nan-in-a-mapping", "task: {synthetic: {label_noise: -.inf}}\n", "task.synthetic.label_noise: must be a finite"),
    ("yaml-syntax", "sample: {samples_per_prompt: 4\n", "config.yaml"),
    ("yaml-top-list", "- a\n- b\n", "top level"),
]


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case,text,fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_before_anything_is_written(case, text, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    code, err = _run_cli(["sft", str(path)], capsys)
    _assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "runs").exists()


ARG_CASES = [
    ("missing-config", ["run", "nope.yaml"], "nope.yaml: config file not found"),
    ("override-without-equals", ["run", "CFG", "--set", "ppo.steps"], "expected KEY=VALUE"),
    ("override-unknown-key", ["run", "CFG", "--set", "ppo.stpes=3"], "did you mean 'steps'"),
    ("override-bad-value", ["run", "CFG", "--set", "sample.samples_per_prompt=0"], "sample.samples_per_prompt"),
    ("override-nan", ["run", "CFG", "--set", "ppo.kl_coef=nan"], "ppo.kl_coef: must be a finite number, got nan"),
    ("override-infinity", ["run", "CFG", "--set", "ppo.target_kl=-inf"], "ppo.target_kl: must be a finite number"),
    ("stage-order", ["reward", "CFG"], "needs stage 'sft' first"),
    ("rank-workers-zero", ["rank", "--input", "in.jsonl", "--output", "out.jsonl", "--workers", "0"], "--workers"),
    ("rank-missing-input", ["rank", "--input", "in.jsonl", "--output", "out.jsonl"], "in.jsonl"),
]


@pytest.mark.parametrize("case,args,fragment", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_bad_arguments(case, args, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "CFG").write_text("name: t\n")
    code, err = _run_cli(args, capsys)
    _assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "out.jsonl").exists()


def test_non_utf8_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    code, err = _run_cli(["run", str(path)], capsys)
    _assert_one_line_error(code, err, "UTF-8")


def test_real_process_exit_code_and_single_line(tmp_path):
    """The installed console script behaves the same as the in-process entry point."""
    path = tmp_path / "c.yaml"
    path.write_text("ppo: {stepz: 3}\n")
    exe = Path(sys.executable).with_name("selfrank")
    proc = subprocess.run([str(exe), "run", str(path)], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ), timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "did you mean 'steps'" in proc.stderr
    assert "Traceback" not in proc.stderr
