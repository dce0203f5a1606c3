"""The one checkpoint format of every training stage (SFT and its baselines, reward model, PPO).

A checkpoint is a folder: one ``<name>.safetensors`` per set of weights, ``optim.pt`` (optimizer and
scheduler states, by name), ``rng.pt`` (torch CPU and every CUDA device, numpy and Python generator
states), ``state.json`` (step, data position, the settings fingerprint, anything JSON-able) and
``checksums.json`` (SHA-256 of every other file). It is written beside the target (``<folder>.new``)
and swapped in by renames, so a kill at any moment leaves the previous checkpoint valid
(:func:`find_checkpoint` also finds it at ``<folder>.old`` when the kill hit the swap itself); loading
verifies every checksum, so a corrupted or truncated checkpoint is reported, never loaded silently.
State is read with ``torch.load(weights_only=True)``; weights are safetensors.

Weights come as a module (its whole state, tied tensors stored once and restored by the module's own
ties) or as a mapping name -> tensor (e.g. only the trainable parameters, or full weights gathered from
ZeRO-3 partitions); a mapping is loaded back into the same names of a module or a mapping of parameters.

Under DeepSpeed the optimizer state is partitioned across processes: each process writes its own part
with DeepSpeed's checkpoint writer into ``<folder>.new/deepspeed/<name>/`` first (``staged``, see
``train/dist/engine_state.py``), then the main process writes the files above, hashes everything the
staging folder holds (the staged files' hashes come from the processes that hashed them) and swaps it
in as one folder: the same atomicity, with several writers. ``checksums.json`` names files by their path
relative to the folder. Files under ``deepspeed/`` are verified by the processes that load them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from selfrank.atomic import naming_disk_full
from selfrank.errors import UserError

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
STATE = "state.json"
OPTIM = "optim.pt"
ENGINE_DIR = "deepspeed"  # DeepSpeed's own per-process files (train/dist/engine_state.py)
Weights = Union[torch.nn.Module, Mapping[str, torch.Tensor]]


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
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensors_to_save(weights: Weights) -> dict[str, torch.Tensor]:
    """Plain CPU copies. A module's tied tensors (GPT-2's lm_head is its input embedding) are kept once:
    safetensors refuses shared storage. Copies, because weights gathered from ZeRO-3 partitions are views
    into larger padded buffers."""
    if isinstance(weights, torch.nn.Module):
        tensors, seen = {}, set()
        for name, tensor in weights.state_dict().items():
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            tensors[name] = tensor.detach().cpu().clone().contiguous()
        return tensors
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in weights.items()}


def _load_into(target: Weights, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy ``tensors`` into ``target`` by name; every saved name must exist there, and every name of the
    target must be saved or share storage with a saved one (a tie)."""
    own = target.state_dict() if isinstance(target, torch.nn.Module) else dict(target)
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise CheckpointError(f"checkpoint {where}: weights {unexpected[:3]} do not match the model being trained")
    loaded_ptrs = {own[name].data_ptr() for name in tensors}
    missing = sorted(name for name, tensor in own.items() if name not in tensors and tensor.data_ptr() not in loaded_ptrs)
    if missing:
        raise CheckpointError(f"checkpoint {where}: weights {missing[:3]} are missing for the model being trained")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if own[name].shape != tensor.shape:
                raise CheckpointError(f"checkpoint {where}: {name} has shape {tuple(tensor.shape)}, the model "
                                      f"{tuple(own[name].shape)}")
            own[name].copy_(tensor.to(own[name].device, own[name].dtype))


def staging_folder(folder: str | os.PathLike) -> Path:
    """Where a checkpoint of ``folder`` is written before it is swapped in (never read by a resume)."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".new")


def file_digest(path: Path, sync: bool = False) -> str:
    """SHA-256 of a file; ``sync``: also flush it to stable storage (fsync) first."""
    if sync:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    return _sha256(path)


def save_checkpoint(folder: str | os.PathLike, *, models: Mapping[str, Weights],
                    optimizers: Mapping[str, object] | None = None, state: dict | None = None,
                    staged: Mapping[str, str] | None = None) -> None:
    """Write a checkpoint to ``folder`` atomically. ``optimizers`` maps a name to anything with a
    ``state_dict()`` (optimizers, schedulers) or to a state dict itself; ``state`` must be JSON-able.

    ``staged``: files other processes already wrote (and synced) into :func:`staging_folder`, as relative
    path -> SHA-256; they become part of this checkpoint. Without it the staging folder starts empty."""
    folder = Path(folder)
    staging = staging_folder(folder)
    if staged is None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    elif not staging.is_dir():
        raise CheckpointError(f"checkpoint {folder}: the staged files are gone ({staging} does not exist)")
    try:
        with naming_disk_full(folder):
            for name, weights in models.items():
                save_file(_tensors_to_save(weights), str(staging / f"{name}.safetensors"))
            optim = {name: opt if isinstance(opt, dict) else opt.state_dict() for name, opt in (optimizers or {}).items()}
            torch.save(optim, staging / OPTIM)
            torch.save(rng_state(), staging / "rng.pt")
            (staging / STATE).write_text(json.dumps(state or {}, indent=2, default=str))
            sums = {}
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                name = path.relative_to(staging).as_posix()
                # Staged files were hashed and synced by the process that reported them; the rest here.
                sums[name] = staged[name] if staged and name in staged else file_digest(path, sync=True)
            missing = sorted(set(staged or {}) - set(sums))
            if missing:
                raise CheckpointError(f"checkpoint {folder}: staged file {missing[0]} is not visible to the main "
                                      "process (the output folder must be on a filesystem every process shares)")
            (staging / CHECKSUMS).write_text(json.dumps(sums, indent=2))
            with open(staging / CHECKSUMS, "rb") as handle:
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


def discard_checkpoint(folder: str | os.PathLike) -> None:
    """Remove a checkpoint and whatever a killed write left beside it (``.new``, ``.old``)."""
    folder = Path(folder)
    for path in (folder, folder.with_name(folder.name + ".old"), folder.with_name(folder.name + ".new")):
        shutil.rmtree(path, ignore_errors=True)


def checksums(folder: Path) -> dict[str, str]:
    """A checkpoint's ``checksums.json``: relative path -> SHA-256."""
    try:
        return json.loads((folder / CHECKSUMS).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder}: unreadable {CHECKSUMS} ({exc})") from None


def file_problem(folder: Path, name: str, expected: str) -> str | None:
    """Why ``folder/name`` fails its checksum (one line), or None when it is intact."""
    path = folder / name
    if not path.is_file():
        return f"checkpoint {folder}: {name} is missing"
    if _sha256(path) != expected:
        return (f"checkpoint {folder}: {name} is corrupted (SHA-256 mismatch); delete the folder to restart the "
                "stage, or restore it")
    return None


def verify_checkpoint(folder: Path, *, engine_files: bool = False) -> None:
    """Check every file against ``checksums.json``; the DeepSpeed files (``deepspeed/``) only when
    ``engine_files`` (the processes that load them verify them, each its share)."""
    for name, expected in checksums(folder).items():
        if not engine_files and name.startswith(ENGINE_DIR + "/"):
            continue
        problem = file_problem(folder, name, expected)
        if problem:
            raise CheckpointError(problem)


def read_state(folder: str | os.PathLike) -> dict | None:
    """The ``state.json`` of the checkpoint to resume from (checksums verified), or None if there is none."""
    found = find_checkpoint(folder)
    if found is None:
        return None
    verify_checkpoint(found)
    return json.loads((found / STATE).read_text())


def check_fingerprint(state: dict, fingerprint: dict, folder: str | os.PathLike, what: str) -> None:
    """Refuse a checkpoint made with other settings or data (``fingerprint``: what the run depends on)."""
    if state.get("fingerprint") != json.loads(json.dumps(fingerprint, default=str)):
        raise CheckpointError(f"{folder}: the checkpoint was made with other {what} settings or data; "
                              "run again without --resume (or with --force) to start over")


def load_checkpoint(folder: str | os.PathLike, *, models: Mapping[str, Weights],
                    optimizers: Mapping[str, object] | None = None, restore_rng: bool = True) -> dict:
    """Verify and load a checkpoint into the given objects; returns its ``state`` dict.

    Weights go into plain (unprepared) modules; optimizers can also be loaded later, once prepared, with
    :func:`load_optimizers`."""
    found = find_checkpoint(folder)
    if found is None:
        raise CheckpointError(f"no checkpoint to resume from in {folder}")
    verify_checkpoint(found)
    for name, target in models.items():
        path = found / f"{name}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {found}: {path.name} is missing")
        _load_into(target, load_file(str(path)), found)
    if optimizers:
        load_optimizers(found, optimizers)
    if restore_rng:
        set_rng_state(torch.load(found / "rng.pt", weights_only=True))
    return json.loads((found / STATE).read_text())


def load_optimizers(folder: str | os.PathLike, optimizers: Mapping[str, object]) -> None:
    """Load optimizer/scheduler states by name; each must be in the checkpoint (a DeepSpeed engine's
    partitioned state is not: it is in ``deepspeed/``, loaded by ``train/dist/engine_state.py``)."""
    found = find_checkpoint(folder)
    if found is None:
        raise CheckpointError(f"no checkpoint to resume from in {folder}")
    states = torch.load(found / OPTIM, weights_only=True)
    for name, opt in optimizers.items():
        if name not in states:
            where = (" (it was written under DeepSpeed, which keeps that state partitioned: resume under the "
                     "same DeepSpeed launch)" if (found / ENGINE_DIR).is_dir() else "")
            raise CheckpointError(f"checkpoint {found} holds no {name} state{where}; run again without --resume "
                                  "(or with --force) to start over")
        opt.load_state_dict(states[name])
