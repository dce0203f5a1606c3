"""Checkpoints: exact round trip, atomic swap, corruption detected."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from selfrank.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint


def _model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=10)
    return model, opt, sched


def _train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randn(5, 4)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_resume_continues_exactly(tmp_path):
    model, opt, sched = _model_and_opt(0)
    _train(model, opt, sched, 3)
    random.seed(5)
    np.random.seed(5)
    save_checkpoint(tmp_path / "ckpt", models={"m": model}, optimizers={"opt": opt, "sched": sched},
                    state={"step": 3})
    expected_draws = (random.random(), float(np.random.rand()))
    _train(model, opt, sched, 4)
    reference = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2 = _model_and_opt(1)  # different init: everything must come from the checkpoint
    state = load_checkpoint(tmp_path / "ckpt", models={"m": model2}, optimizers={"opt": opt2, "sched": sched2})
    assert state == {"step": 3}
    assert (random.random(), float(np.random.rand())) == expected_draws
    _train(model2, opt2, sched2, 4)
    for a, b in zip(reference, model2.parameters()):
        assert torch.equal(a, b)


def test_corruption_and_truncation_are_detected(tmp_path):
    model, opt, sched = _model_and_opt(0)
    save_checkpoint(tmp_path / "ckpt", models={"m": model}, optimizers={"opt": opt}, state={"step": 1})
    weights = tmp_path / "ckpt" / "m.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="m.safetensors is corrupted"):
        load_checkpoint(tmp_path / "ckpt", models={"m": model})
    optim = tmp_path / "ckpt" / "optim.pt"
    optim.write_bytes(optim.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path / "ckpt", models={"m": model})


def test_kill_during_swap_keeps_previous_checkpoint(tmp_path):
    model, opt, _ = _model_and_opt(0)
    save_checkpoint(tmp_path / "ckpt", models={"m": model}, state={"step": 1})
    # A kill after the old folder was moved aside and before the new one was renamed in:
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")
    (tmp_path / "ckpt.new").mkdir()
    (tmp_path / "ckpt.new" / "m.safetensors").write_bytes(b"partial")
    assert find_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt.old"
    assert load_checkpoint(tmp_path / "ckpt", models={"m": model}) == {"step": 1}
    save_checkpoint(tmp_path / "ckpt", models={"m": model}, state={"step": 2})
    assert load_checkpoint(tmp_path / "ckpt", models={"m": model}) == {"step": 2}
    assert not (tmp_path / "ckpt.old").exists() and not (tmp_path / "ckpt.new").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    model, _, _ = _model_and_opt(0)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none", models={"m": model})
