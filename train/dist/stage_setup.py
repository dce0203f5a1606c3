"""What the training stages (SFT, reward) do around ``train.dist``: one job per module, shared.

* :func:`begin_training` readies the cached Accelerator for one training run: its micro-step counter
  starts at 0 and, under DeepSpeed, the batch bookkeeping of the job's config is set for THIS run (the
  config is filled in place by the first ``prepare``, so a later stage would otherwise inherit the
  previous stage's accumulation count).
* :func:`end_training` releases the prepared objects (and the DeepSpeed engine) before the next run.
* :func:`split_parts` / :func:`uneven_shard` cut batches whose size need not divide evenly.
* :func:`stage_cost` is the ``processes`` / ``gpu_hours`` entry of a stage summary.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

from selfrank.errors import UserError

from selfrank.train import dist

T = TypeVar("T")
# ``log(metrics, step)``: a stage's per-step metrics, already reduced across ranks.
StepLog = Callable[[dict, int], None]


def begin_training(accumulation: int, micro_batch_size: int, mixed_precision: str | None = None):
    """The Accelerator for a training run of ``accumulation`` micro-batches per optimizer step, computing
    in ``mixed_precision`` (``model.mixed_precision``; None: as the Accelerator already is)."""
    acc = dist.get_accelerator(accumulation, mixed_precision)
    config = dist.deepspeed_config(acc)
    if config is not None:
        config["gradient_accumulation_steps"] = accumulation
        config["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
        config["train_batch_size"] = int(micro_batch_size) * accumulation * acc.num_processes
        acc.gradient_accumulation_steps = accumulation
    acc.step = 0  # accelerate counts micro-steps across runs; each run starts on a step boundary
    return acc


def end_training(acc) -> None:
    """Drop the accelerator's references to this run's model/optimizer (frees a DeepSpeed engine)."""
    acc.free_memory()


def split_parts(items: Sequence[T], parts: int) -> list[list[T]]:
    """``items`` in ``parts`` contiguous chunks whose sizes differ by at most one (none empty)."""
    if parts < 1 or len(items) < parts:
        raise ValueError(f"cannot split {len(items)} items into {parts} non-empty parts")
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def uneven_shard(items: Sequence[T], acc) -> tuple[list[T], bool]:
    """This rank's contiguous slice of ``items`` when the count need not divide by the world size.

    Returns ``(slice, real)``. A rank left with nothing (fewer items than ranks) gets the first item
    with ``real=False``: it must still run its forward/backward (DDP and ZeRO are collective) but
    weigh the result 0. Losses normalised by the GLOBAL item count stay exact for uneven slices.
    """
    world, rank = acc.num_processes, acc.process_index
    if not items:
        raise ValueError("uneven_shard of an empty batch")
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    end = start + base + (1 if rank < extra else 0)
    if start == end:
        return [items[0]], False
    return list(items[start:end]), True


def micro_batches(shard: Sequence[T], accumulation: int, what: str) -> list[list[T]]:
    """This rank's shard in exactly ``accumulation`` micro-batches (accelerate counts them to sync)."""
    if len(shard) < accumulation:
        raise UserError(f"{what}: {len(shard)} examples per process cannot fill {accumulation} accumulation "
                        "steps; lower grad_accum or raise batch_size")
    return split_parts(shard, accumulation)


def stage_cost(seconds: float, world: int | None = None) -> dict:
    """``processes`` and ``gpu_hours`` (processes x wall hours on CUDA, else 0) for a stage summary."""
    world = dist.world_size() if world is None else world
    gpu_hours = world * seconds / 3600.0 if torch.cuda.is_available() else 0.0
    return {"processes": world, "gpu_hours": gpu_hours}
