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


# ---- files staged by other processes (a DeepSpeed engine's partitions) -------------------------------
def _stage(folder, files: dict[str, bytes]) -> dict[str, str]:
    """What every process of a DeepSpeed job does before the main one saves: write its files into the
    staging folder, sync and hash them (here: this process plays all of them)."""
    from selfrank.train.checkpoint import file_digest, staging_folder

    staging = staging_folder(folder)
    sums = {}
    for name, data in files.items():
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        sums[name] = file_digest(path, sync=True)
    return sums


PARTITIONS = {"deepspeed/layout.json": b"{}", "deepspeed/opt/state/zero_pp_rank_0_optim_states.pt": b"rank 0",
              "deepspeed/opt/state/zero_pp_rank_1_optim_states.pt": b"rank 1"}


def test_staged_files_become_part_of_the_checkpoint_and_are_verified(tmp_path):
    from selfrank.train.checkpoint import checksums, read_state, verify_checkpoint

    model, opt, _ = _model_and_opt(0)
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, models={"m": model}, state={"step": 1})  # a previous checkpoint
    staged = _stage(folder, PARTITIONS)
    save_checkpoint(folder, models={"m": model}, optimizers={}, state={"step": 2}, staged=staged)
    sums = checksums(folder)
    assert {name: sums[name] for name in PARTITIONS} == staged and "m.safetensors" in sums
    assert (folder / "deepspeed/opt/state/zero_pp_rank_1_optim_states.pt").read_bytes() == b"rank 1"
    assert not (tmp_path / "ckpt.new").exists() and not (tmp_path / "ckpt.old").exists()
    # A corrupted partition: the weights and state still load (each process verifies the engine files it
    # loads), and a full verification names the file.
    (folder / "deepspeed/opt/state/zero_pp_rank_1_optim_states.pt").write_bytes(b"rank 9")
    assert read_state(folder) == {"step": 2}
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_optim_states.pt is corrupted"):
        verify_checkpoint(folder, engine_files=True)


def test_a_staged_file_the_main_process_cannot_see_is_refused(tmp_path):
    """Node-local folders: a process reports a file the main process cannot find. Nothing is swapped in."""
    model, _, _ = _model_and_opt(0)
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, models={"m": model}, state={"step": 1})
    staged = _stage(folder, PARTITIONS)
    staged["deepspeed/opt/state/zero_pp_rank_2_optim_states.pt"] = "0" * 64  # written on another node
    with pytest.raises(CheckpointError, match="not visible to the main process"):
        save_checkpoint(folder, models={"m": model}, state={"step": 2}, staged=staged)
    assert load_checkpoint(folder, models={"m": model}) == {"step": 1}
    assert not (tmp_path / "ckpt.new").exists()


def test_a_kill_while_processes_stage_their_files_keeps_the_previous_checkpoint(tmp_path):
    model, _, _ = _model_and_opt(0)
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, models={"m": model}, state={"step": 1})
    _stage(folder, {"deepspeed/opt/state/zero_pp_rank_0_optim_states.pt": b"half"})  # then the job died
    assert find_checkpoint(folder) == folder
    assert load_checkpoint(folder, models={"m": model}) == {"step": 1}
    save_checkpoint(folder, models={"m": model}, state={"step": 2})  # the next save starts a clean staging
    assert not (folder / "deepspeed").exists() and load_checkpoint(folder, models={"m": model}) == {"step": 2}


def test_optimizer_state_missing_from_the_checkpoint_is_an_error_not_a_restart(tmp_path):
    from selfrank.train.checkpoint import load_optimizers

    model, opt, _ = _model_and_opt(0)
    save_checkpoint(tmp_path / "ddp", models={"m": model}, optimizers={"opt": opt}, state={})
    staged = _stage(tmp_path / "ds", PARTITIONS)
    save_checkpoint(tmp_path / "ds", models={"m": model}, optimizers={}, state={}, staged=staged)
    load_optimizers(tmp_path / "ddp", {"opt": opt})
    with pytest.raises(CheckpointError, match="holds no opt state \\(it was written under DeepSpeed"):
        load_optimizers(tmp_path / "ds", {"opt": opt})


def test_engine_state_from_another_layout_is_refused_in_one_line(tmp_path):
    """A DeepSpeed resume needs the partitions of the same layout; one process here (ZeRO-0, 1 process)
    meets a checkpoint of ZeRO-2 on 2 processes, or one written without DeepSpeed."""
    import json

    from selfrank.train import dist

    model, opt, _ = _model_and_opt(0)
    acc = dist.get_accelerator()
    save_checkpoint(tmp_path / "plain", models={"m": model}, optimizers={"opt": opt}, state={})
    with pytest.raises(CheckpointError, match="holds no DeepSpeed state \\(it was written without DeepSpeed\\)"):
        dist.load_engine_states(tmp_path / "plain", {"opt": None}, acc)
    layout = {"engines": ["opt"], "zero_stage": 2, "processes": 2, "mixed_precision": "bf16"}
    staged = _stage(tmp_path / "ds", {"deepspeed/layout.json": json.dumps(layout).encode()})
    save_checkpoint(tmp_path / "ds", models={"m": model}, optimizers={}, state={}, staged=staged)
    with pytest.raises(CheckpointError, match=r"written under DeepSpeed ZeRO-2, 2 processes, mixed precision bf16 "
                                              r"\(engines \['opt'\]\); this run has ZeRO-0, 1 processes"):
        dist.load_engine_states(tmp_path / "ds", {"opt": None}, acc)
