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
