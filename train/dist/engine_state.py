"""A DeepSpeed engine's training state inside the one checkpoint format (``train/checkpoint.py``).

ZeRO partitions the optimizer state (moments, float32 master weights, loss scaler, step counts) across
processes, so no process can save it alone. :func:`stage_engine_states` has every process write its
partition with DeepSpeed's own writer (``engine.save_checkpoint``) into the checkpoint's staging folder,
``<checkpoint>.new/deepspeed/<name>/state/``, next to ``layout.json`` (ZeRO stage, processes, precision).
The main process then writes the usual files and swaps the whole folder in (``save_checkpoint(...,
staged=...)``); :func:`load_engine_states` restores the partitions into freshly prepared engines.

Atomicity with several writers: nothing is written outside ``<checkpoint>.new``, which a resume never
reads; the main process empties it only after a barrier (no process still writes into it), and swaps it
in only after every process has written, synced and hashed its share (a barrier, then the hashes are
gathered). A kill at any moment thus leaves the previous checkpoint (``<checkpoint>`` or, if the kill hit
the swap, ``<checkpoint>.old``) whole, and a half-written ``.new`` is discarded by the next save.

Assumption: the checkpoint folder is on a filesystem every process shares (one node's disk, or NFS /
Lustre / GPFS for several nodes) with close-to-open consistency. It is checked, not trusted: the processes
compare their listings of the staged files, and the main process must see every staged file; a
node-local folder is refused with one line (so is DeepSpeed's ``checkpoint.use_node_local_storage``).

Resume needs the same layout (ZeRO stage, number of processes, mixed precision), since partitions follow
it; another layout is refused with one line. The files are read with ``torch.load(weights_only=True)``,
allowing only DeepSpeed's plain state classes, and verified against their checksums first, each process
its share. ZeRO-1/2 also write the module's 16-bit weights once (``mp_rank_00_model_states.pt``), a copy
of the safetensors weights that DeepSpeed's loader needs.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from selfrank.atomic import naming_disk_full, write_json
from selfrank.errors import UserError
from selfrank.train.checkpoint import (
    ENGINE_DIR,
    CheckpointError,
    checksums,
    file_digest,
    file_problem,
    find_checkpoint,
    staging_folder,
)
from selfrank.train.dist.collectives import gather_lists, zero_stage

__all__ = ["stage_engine_states", "load_engine_states", "engine_layout", "TAG", "LAYOUT"]

TAG = "state"  # DeepSpeed's checkpoint tag: one state per checkpoint folder
LAYOUT = "layout.json"


def engine_layout(accelerator, names) -> dict:
    """What the saved partitions depend on; a resume must match it."""
    return {"engines": sorted(names), "zero_stage": zero_stage(accelerator), "processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision}


def _check_writable(engine) -> None:
    if engine.use_node_local_storage():
        raise UserError("DeepSpeed config: checkpoint.use_node_local_storage is not supported (a checkpoint is "
                        "one folder on a filesystem every process shares); remove it")
    writer = type(engine.checkpoint_engine).__name__
    if writer != "TorchCheckpointEngine":
        raise UserError(f"DeepSpeed config: checkpoint writer {writer} is not supported (checkpoints are written "
                        "synchronously, then swapped in atomically); remove the checkpoint writer settings")


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def stage_engine_states(folder: str | Path, engines: Mapping[str, Any], accelerator) -> dict[str, str]:
    """Write every engine's partitions into the staging folder of checkpoint ``folder``. Collective.

    Returns relative path -> SHA-256 of the staged files (every process gets it), for
    ``save_checkpoint(folder, ..., staged=...)`` on the main process, which must follow before anything
    else touches the staging folder."""
    staging = staging_folder(folder)
    root = staging / ENGINE_DIR
    for engine in engines.values():
        _check_writable(engine)
    accelerator.wait_for_everyone()  # nobody still reads or writes a previous staging folder
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        root.mkdir(parents=True)
        write_json(root / LAYOUT, engine_layout(accelerator, engines))
    accelerator.wait_for_everyone()
    with naming_disk_full(folder):
        for name, engine in engines.items():
            # Each process writes its own partition (and the main one the module file); ends in a barrier.
            engine.save_checkpoint(str(root / name), tag=TAG, client_state={}, save_latest=False)
    accelerator.wait_for_everyone()
    listing = _files(staging)
    views = gather_lists([listing])
    if any(view != listing for view in views):
        raise CheckpointError(f"checkpoint {folder}: the processes see different files in {staging} (a folder "
                              "local to each node?); put the output folder on a filesystem every process shares")
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = {name: file_digest(staging / name, sync=True) for i, name in enumerate(listing) if i % world == rank}
    return {name: digest for part in gather_lists([mine]) for name, digest in part.items()}


def _deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its state files pickle besides tensors and containers (plain state holders)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only(engine) -> Iterator[None]:
    """DeepSpeed's loader with ``torch.load(weights_only=True)`` (its own loads any pickle)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyLoader(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    previous = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyLoader()
    try:
        yield
    finally:
        engine.checkpoint_engine = previous


def _describe(layout: dict) -> str:
    return (f"ZeRO-{layout.get('zero_stage')}, {layout.get('processes')} processes, mixed precision "
            f"{layout.get('mixed_precision')}")


def load_engine_states(folder: str | Path, engines: Mapping[str, Any], accelerator) -> None:
    """Restore every engine's partitions from checkpoint ``folder`` (freshly prepared engines). Collective.

    Every process verifies its share of the DeepSpeed files first; all raise the same one-line error
    when any is missing or corrupted, or when the checkpoint was written under another layout."""
    found = find_checkpoint(folder)
    if found is None:
        raise CheckpointError(f"no checkpoint to resume from in {folder}")
    sums = checksums(found)
    layout_name = f"{ENGINE_DIR}/{LAYOUT}"
    if layout_name not in sums:
        raise CheckpointError(f"checkpoint {found} holds no DeepSpeed state (it was written without DeepSpeed); "
                              "resume under the launch that wrote it, or run again without --resume to start over")
    problem = file_problem(found, layout_name, sums[layout_name])
    if problem:
        raise CheckpointError(problem)
    saved = json.loads((found / layout_name).read_text())
    current = engine_layout(accelerator, engines)
    if saved != current:
        raise CheckpointError(f"checkpoint {found} was written under DeepSpeed {_describe(saved)} "
                              f"(engines {saved.get('engines')}); this run has {_describe(current)} (engines "
                              f"{current['engines']}): resume with the same launch, or run again without --resume")
    names = sorted(name for name in sums if name.startswith(ENGINE_DIR + "/"))
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = [file_problem(found, name, sums[name]) for i, name in enumerate(names) if i % world == rank]
    problems = gather_lists([p for p in mine if p])
    if problems:
        raise CheckpointError(problems[0])
    for name, engine in engines.items():
        with _weights_only(engine):
            path, _ = engine.load_checkpoint(str(found / ENGINE_DIR / name), tag=TAG, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"checkpoint {found}: DeepSpeed could not load {ENGINE_DIR}/{name}")
