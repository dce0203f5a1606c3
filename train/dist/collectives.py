"""Collectives and process identity: who this process is, the one Accelerator, sharding, reductions.

Batch rule: a stage configures the GLOBAL batch size; every rank takes its contiguous slice of each
global batch (:func:`shard_batch`), so each example is used exactly once per epoch across ranks and a
run on N processes follows the same trajectory as on one (up to float summation order).

Failure rule: the process group has a finite timeout, ``SELFRANK_DIST_TIMEOUT`` seconds (default 600).
A rank that dies or stalls makes the collective on the other ranks raise after at most that long
(usually at once: gloo/NCCL see the closed connection, and the launcher stops the remaining ranks), so a
job fails loudly instead of holding its nodes forever. Raise it for very long single steps (e.g. a
reference model that takes minutes to load on one rank while the others wait).
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch

from selfrank.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["rank", "world_size", "local_rank", "is_main", "dist_timeout", "shutdown", "get_accelerator", "uses_deepspeed", "deepspeed_config", "zero_stage", "shard_bounds", "shard_batch", "per_rank_seed", "global_mean_loss", "reduce_sum", "reduce_mean", "gather_lists", "round_robin", "save_on_main", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S"]

TIMEOUT_ENV = "SELFRANK_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
# Distinct sampling streams per rank; rank 0 keeps the configured seed so that a one-process run is
# unchanged by this layer. A large prime keeps nearby seeds of different runs from sharing streams.
_RANK_SEED_STRIDE = 1_000_003

_ACCELERATOR = None  # the one Accelerator of this process (see get_accelerator)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------
# Process identity (cheap: no Accelerator needed)

def rank() -> int:
    """Global rank of this process: the process group's if one exists, else the launcher's ``RANK``, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes in the job (1 without a launcher)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """Rank of this process on its node (the launcher's ``LOCAL_RANK``; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the global rank 0: the process that logs, writes files and shows progress bars."""
    return rank() == 0


def dist_timeout() -> timedelta:
    """The process-group timeout from ``SELFRANK_DIST_TIMEOUT`` (seconds, > 0; default 600)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}: expected a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV}: must be > 0 seconds, got {raw!r}")
    return timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------------------------
# The Accelerator

def shutdown() -> None:
    """Tear the process group down before the interpreter exits (no-op without one).

    Why: left to interpreter shutdown, gloo's worker threads can be destroyed while still joinable,
    which aborts a process that has finished all its work (SIGABRT, "terminate called without an
    active exception"; seen once in a CI run after a 2-process PPO job had written its outputs), and
    the launcher then reports the whole job as failed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _launched() -> bool:
    return "LOCAL_RANK" in os.environ or world_size() > 1


def get_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str | None = None):
    """This process's Accelerator, created on first use and cached (accelerate's state is per process).

    Works with no launcher (one process), ``accelerate launch`` (DDP) and ``accelerate launch
    --use_deepspeed``. Without CUDA the process group uses gloo (NCCL needs GPUs, and DeepSpeed on CPU
    must agree with accelerate on the backend). The group's timeout comes from :func:`dist_timeout`.

    ``mixed_precision`` is the run's ``model.mixed_precision`` (see ``train/precision.py``): the
    Accelerator is created with it (it fills DeepSpeed's ``bf16``/``fp16`` "auto"), after refusing a
    launcher or DeepSpeed JSON that says otherwise; None takes the launcher's value (else "no") on
    creation and accepts the cached one later. Asking for another precision once created is refused
    under a launcher; one process without a launcher (tests, library use) gets a new Accelerator.

    Stages run one after another in one process, so a later call may ask for another accumulation
    count: it is applied to the cached Accelerator. Under DeepSpeed the JSON config's
    ``gradient_accumulation_steps`` governs (accelerate takes it from there when a model is prepared).
    """
    global _ACCELERATOR
    from selfrank.train.precision import check_precision_request, launcher_precision

    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if mixed_precision is not None:
        check_precision_request(mixed_precision)  # cheap; refuses a conflicting launch before any work
    if _ACCELERATOR is not None and mixed_precision is not None and _ACCELERATOR.mixed_precision != mixed_precision:
        if _launched() or uses_deepspeed(_ACCELERATOR):
            raise UserError(f"model.mixed_precision: this job already runs with {_ACCELERATOR.mixed_precision!r}, "
                            f"cannot switch to {mixed_precision!r} midway; use one setting for the whole run")
        from accelerate.state import AcceleratorState

        _ACCELERATOR.free_memory()
        AcceleratorState._reset_state()  # one process, no process group: only the precision state goes
        _ACCELERATOR = None
    if _ACCELERATOR is None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        if mixed_precision is None:
            mixed_precision = launcher_precision() or "no"
            check_precision_request(mixed_precision)
        handlers = []
        if _launched():
            # Only under a launcher: with an explicit backend and no launcher, accelerate expects a process
            # group that nobody creates.
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            handlers.append(InitProcessGroupKwargs(backend=backend, timeout=dist_timeout()))
        _ACCELERATOR = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps,
                                   mixed_precision=mixed_precision, kwargs_handlers=handlers)
        log.info("accelerator: %s, %d process(es), device %s, mixed precision %s", _ACCELERATOR.distributed_type,
                 _ACCELERATOR.num_processes, _ACCELERATOR.device, _ACCELERATOR.mixed_precision)
    elif _ACCELERATOR.gradient_accumulation_steps != gradient_accumulation_steps and not uses_deepspeed(_ACCELERATOR):
        _ACCELERATOR.gradient_accumulation_steps = gradient_accumulation_steps
    return _ACCELERATOR


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_config(accelerator) -> dict | None:
    """The DeepSpeed JSON config the job was launched with (None outside DeepSpeed)."""
    if not uses_deepspeed(accelerator):
        return None
    return accelerator.state.deepspeed_plugin.deepspeed_config


def zero_stage(accelerator) -> int:
    """The ZeRO stage of the job (0 outside DeepSpeed)."""
    config = deepspeed_config(accelerator)
    return int(config.get("zero_optimization", {}).get("stage", 0)) if config else 0


# ---------------------------------------------------------------------------------------------------------
# Data

def shard_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank_``'s contiguous slice of a global batch of ``n`` items."""
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} out of range for world size {world}")
    if n % world:
        raise UserError(f"global batch size {n} is not divisible by the number of processes ({world}): "
                        f"set the batch size to a multiple of {world}")
    per_rank = n // world
    return rank_ * per_rank, (rank_ + 1) * per_rank


def shard_batch(global_batch: Sequence[T], accelerator) -> list[T]:
    """This rank's contiguous slice of ``global_batch`` (every item goes to exactly one rank).

    The global batch size must be a multiple of the number of processes: an uneven split would change
    the loss weighting between ranks and break equivalence with a one-process run.
    """
    start, end = shard_bounds(len(global_batch), accelerator.process_index, accelerator.num_processes)
    return list(global_batch[start:end])


def per_rank_seed(seed: int, accelerator) -> int:
    """A sampling seed distinct per rank (rank 0 keeps ``seed``), so ranks do not draw identical samples."""
    return seed + _RANK_SEED_STRIDE * accelerator.process_index


# ---------------------------------------------------------------------------------------------------------
# Losses and metrics

def global_mean_loss(loss_sum: torch.Tensor, count: torch.Tensor | int | float, accelerator) -> torch.Tensor:
    """The loss to backpropagate so that the update follows the gradient of the GLOBAL token mean.

    ``loss_sum`` is this rank's sum of per-token losses for the current micro-batch; ``count`` is this
    rank's number of tokens for the whole optimizer step (all its micro-batches). The counts are summed
    over ranks, and the result is multiplied by ``world_size * gradient_accumulation_steps`` because DDP
    and DeepSpeed average gradients over ranks and accelerate/DeepSpeed divide the loss by the number of
    accumulation steps. Ranks with more tokens thus weigh more, exactly as in a one-process run over the
    whole global batch (a per-rank mean would over-weight the tokens of short sequences).

    Collective: every rank must call it for every micro-batch.
    """
    local = torch.as_tensor(count, dtype=torch.float64, device=accelerator.device).detach().reshape(1)
    total = reduce_sum(local, accelerator).clamp_min(1.0)
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps
    return loss_sum * (scale / total.to(loss_sum.dtype).reshape(()))


def reduce_sum(value: torch.Tensor | float, accelerator) -> torch.Tensor:
    """Sum of ``value`` over ranks (a new tensor; the input is untouched). Collective."""
    tensor = torch.as_tensor(value, device=accelerator.device).detach().clone()
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor, reduction="sum")


def reduce_mean(value: torch.Tensor | float, accelerator) -> float:
    """Mean over ranks of a scalar metric, as a float (every rank gets the same value). Collective."""
    tensor = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device)
    return float(reduce_sum(tensor, accelerator)) / accelerator.num_processes


def gather_lists(items: list, group=None) -> list:
    """All ranks' lists concatenated in rank order (picklable items; every rank gets it), over
    ``group`` (default: the job's; e.g. a gloo group with a long timeout, for stages that work for
    hours between collectives). Collective."""
    if world_size() == 1:
        return list(items)
    out: list = [None] * world_size()
    torch.distributed.all_gather_object(out, list(items), group=group)
    return [item for part in out for item in part]


def round_robin(items: Sequence[T]) -> list[tuple[int, T]]:
    """This process's share of ``items`` as ``(index, item)``: item ``i`` goes to rank ``i % world``."""
    rank_, world = rank(), world_size()
    return [(index, item) for index, item in enumerate(items) if index % world == rank_]


def save_on_main(fn: Callable[[], T], accelerator) -> T | None:
    """Run ``fn`` on the main process only, between two barriers; its result on main, ``None`` elsewhere.

    The first barrier makes sure every rank finished the step that produced what is saved; the second
    that no rank reads the files (or exits) before they exist.
    """
    accelerator.wait_for_everyone()
    result = fn() if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return result
