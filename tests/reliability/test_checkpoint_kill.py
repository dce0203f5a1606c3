"""SIGKILL while a checkpoint is being written, many times: the folder always loads, old or new.

Each kill lands at a seeded random file operation of the writer (it stops itself there and is
killed while stopped), so what the kills hit does not depend on the speed of the machine."""
from __future__ import annotations

import os
import random
import signal
import sys

import pytest
import torch

from selfrank.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint

KILLS = 30
# A checkpoint write makes about 17 file operations that Python sees (native writers make none):
# a kill within the first 60 of a process lets a few complete, then cuts one.
POINTS = 60
_FILE_EVENTS = ("open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree")


def _model(step: int) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    return model


def _stop_at_file_operation(folder, point: int) -> None:
    """Make this process stop itself (SIGSTOP) at its ``point``-th file operation inside ``folder``."""
    inside, seen = str(folder) + os.sep, [0]

    def on_event(event: str, args: tuple) -> None:
        if event in _FILE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)) \
                and os.fsdecode(args[0]).startswith(inside):
            if seen[0] == point:
                os.kill(os.getpid(), signal.SIGSTOP)
            seen[0] += 1

    sys.addaudithook(on_event)


def _save_forever(folder, first_step: int) -> None:
    """Child process: write checkpoints of steps first_step, first_step + 1, ... until killed."""
    torch.set_num_threads(1)
    step = first_step
    while True:
        model = _model(step)
        optimizer = torch.optim.AdamW(model.parameters())
        save_checkpoint(folder, models={"model": model}, optimizers={"opt": optimizer}, state={"step": step})
        step += 1


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_never_loses_the_checkpoint(tmp_path):
    folder = tmp_path / "checkpoint"
    rng = random.Random(7)
    last_step = -1
    mid_write = 0  # kills that left a half-written staging folder: the case that matters
    for kill in range(KILLS):
        point = rng.randrange(POINTS)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                _stop_at_file_operation(tmp_path, point)
                _save_forever(folder, last_step + 1)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"the writer ended before file operation {point}"
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        mid_write += folder.with_name("checkpoint.new").exists()
        found = find_checkpoint(folder)
        if found is None:  # killed before the very first checkpoint was complete
            assert last_step == -1
            continue
        model = _model(-1)
        state = load_checkpoint(folder, models={"model": model})
        step = state["step"]
        # The loaded checkpoint is whole (every weight of one step) and never older than the last one loaded.
        assert all(bool((p == float(step)).all()) for p in model.parameters())
        assert step >= last_step
        last_step = step
    print(f"\n{KILLS} kills: {mid_write} inside a checkpoint write, last checkpoint step {last_step}")
    assert last_step >= 5, f"too few checkpoints completed ({last_step}) for the test to mean much"
    assert mid_write >= 5, f"only {mid_write} of {KILLS} kills landed inside a checkpoint write"


def test_corrupted_checkpoint_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, models={"model": _model(1)}, state={"step": 1})
    rng_file = folder / "rng.pt"
    good = rng_file.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    rng_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rng\.pt is corrupted"):
        load_checkpoint(folder, models={"model": _model(0)})
    rng_file.write_bytes(good)
    (folder / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"state\.json is missing"):
        load_checkpoint(folder, models={"model": _model(0)})
