"""Crash-safe training checkpoints with checksums, for exact resume.

A checkpoint is a folder: one ``<name>.safetensors`` per model, ``optim.pt`` (optimiser and scheduler
states), ``rng.pt`` (torch, numpy and Python generator states), ``state.json`` (step, data position,
anything JSON-able) and ``checksums.json`` (SHA-256 of every other file). It is written beside the
target and swapped in by renames, so a kill at any point leaves the previous checkpoint valid; loading
verifies every checksum, so a corrupted or truncated checkpoint is reported, never loaded silently.
State is read with ``torch.load(weights_only=True)``; weights are safetensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from selfrank.atomic import naming_disk_full
from selfrank.errors import UserError

CHECKSUMS = "checksums.json"


class CheckpointError(UserError):
    """A checkpoint that is missing files or fails its checksums."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights (e.g. GPT-2's lm_head and wte) share storage; safetensors refuses shared
    # tensors, so each is saved as its own contiguous copy and loaded back by name.
    return {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}


def save_checkpoint(folder: str | os.PathLike, *, models: dict[str, torch.nn.Module],
                    optimizers: dict[str, object] | None = None, state: dict | None = None) -> None:
    """Write a checkpoint to ``folder`` atomically (``optimizers`` may hold schedulers too)."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with naming_disk_full(folder):
            for name, model in models.items():
                save_file(_model_tensors(model), str(staging / f"{name}.safetensors"))
            torch.save({name: opt.state_dict() for name, opt in (optimizers or {}).items()}, staging / "optim.pt")
            torch.save(rng_state(), staging / "rng.pt")
            (staging / "state.json").write_text(json.dumps(state or {}, indent=2))
            sums = {p.name: _sha256(p) for p in sorted(staging.iterdir())}
            (staging / CHECKSUMS).write_text(json.dumps(sums, indent=2))
            for path in staging.iterdir():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # never leave a half-written copy beside the checkpoint
        raise
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and find_checkpoint(old) == old:
        # A kill hit the last swap: the previous checkpoint lives only in ``.old``; put it back before
        # anything deletes ``.old``, so that a valid checkpoint exists at every moment.
        os.replace(old, folder)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the folder, or its previous version if a kill hit the swap."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if (candidate / CHECKSUMS).is_file():
            return candidate
    return None


def verify_checkpoint(folder: Path) -> None:
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: unreadable {CHECKSUMS} ({exc})") from None
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        if _sha256(path) != expected:
            raise CheckpointError(f"checkpoint {folder}: {name} is corrupted (SHA-256 mismatch); "
                                  "delete the folder to restart the stage, or restore it")


def load_checkpoint(folder: str | os.PathLike, *, models: dict[str, torch.nn.Module],
                    optimizers: dict[str, object] | None = None, restore_rng: bool = True) -> dict:
    """Verify and load a checkpoint into the given objects; returns its ``state`` dict."""
    found = find_checkpoint(folder)
    if found is None:
        raise CheckpointError(f"no checkpoint to resume from in {folder}")
    verify_checkpoint(found)
    for name, model in models.items():
        tensors = load_file(str(found / f"{name}.safetensors"))
        model.load_state_dict(tensors, strict=True)
    optim_states = torch.load(found / "optim.pt", weights_only=True)
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(optim_states[name])
    if restore_rng:
        set_rng_state(torch.load(found / "rng.pt", weights_only=True))
    return json.loads((found / "state.json").read_text())
