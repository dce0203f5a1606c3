"""bench/gpu_check.sh in its CPU mode: the wiring a GPU run uses (DeepSpeed, bf16 from model.mixed_precision,
2 processes), here the ZeRO-3 run: every stage with bf16 weights partitioned, including a reward model
whose head is created on a backbone loaded partitioned (it must join the engine's bf16)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_the_bf16_pipeline_under_zero3(tmp_path):
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--tiny", "--stages", "zero3",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_zero3.json").read_text())
    assert result["processes"] == 2 and result["zero_stage"] == 3
    assert result["mixed_precision"] == "bf16" and result["deepspeed_bf16"] == {"enabled": True}
    assert list(result["stages"]) == ["sft", "sample", "reward", "ppo"]
    assert result["stages"]["ppo"]["tokens_per_s"] > 0
    assert " zero3    ppo:" in proc.stdout


def test_gpu_check_reaches_the_full_size_smollm2_configs(tmp_path):
    """--smollm2 runs configs/smollm2_<task>.yaml through accelerate with the given overrides; --dry-run
    stops after the preflight (world size layouts, the converted model, the local data), as a GPU would
    start it, on 2 CPU processes."""
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--smollm2-only", "--smollm2",
                           "squad_v2", "--set", "ppo.steps=20", "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for task in ("squad_v2",):  # dailydialog goes the same way (one task keeps the test short)
        log = (tmp_path / f"smollm2_{task}.log").read_text()
        assert f"checks passed; nothing was run (run folder: {tmp_path / 'runs' / f'gpu-smollm2-{task}'})" in log
        assert f"gpu_check: smollm2 {task} done" in proc.stdout
    assert not (tmp_path / "runs").exists()
    bad = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--smollm2-only", "--smollm2", "nope",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "no config" in bad.stderr
