"""The distributed layer every training stage runs on: accelerate (DDP) or accelerate + DeepSpeed ZeRO.

One code path serves one process (no launcher), CPU multi-process (gloo) and GPU clusters (NCCL). A stage
written for one process is ported by swapping a handful of calls::

    acc = get_accelerator(cfg.grad_accum)
    batch = shard_batch(global_batch, acc)                  # this rank's contiguous slice
    model, opt = prepare_trainable(acc, model, opt, micro_batch_size=len(batch), max_grad_norm=cfg.max_grad_norm)
    ref = prepare_frozen(ref_model, acc)                    # reference / reward model, no optimizer
    with gathered_for_generation(model, acc) as m:          # full weights for fast generate()
        out = m.generate(...)
    loss_sum, n = token_sum_loss(...)                       # sum over tokens, and the token count
    acc.backward(global_mean_loss(loss_sum, n, acc))        # gradient of the GLOBAL token mean
    opt.step(); opt.zero_grad()
    save_full(model, acc, lambda m: save_model(m, tok, folder))   # plain save_pretrained folder

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

import contextlib
import copy
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from ranking.errors import UserError

log = logging.getLogger(__name__)

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


def get_accelerator(gradient_accumulation_steps: int = 1):
    """This process's Accelerator, created on first use and cached (accelerate's state is per process).

    Works with no launcher (one process), ``accelerate launch`` (DDP) and ``accelerate launch
    --use_deepspeed``. Without CUDA the process group uses gloo (NCCL needs GPUs, and DeepSpeed on CPU
    must agree with accelerate on the backend). The group's timeout comes from :func:`dist_timeout`.

    Stages run one after another in one process, so a later call may ask for another accumulation
    count: it is applied to the cached Accelerator. Under DeepSpeed the JSON config's
    ``gradient_accumulation_steps`` governs (accelerate takes it from there when a model is prepared).
    """
    global _ACCELERATOR
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if _ACCELERATOR is None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        handlers = []
        if "LOCAL_RANK" in os.environ or world_size() > 1:
            # Only under a launcher: with an explicit backend and no launcher, accelerate expects a process
            # group that nobody creates.
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            handlers.append(InitProcessGroupKwargs(backend=backend, timeout=dist_timeout()))
        _ACCELERATOR = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps,
                                   kwargs_handlers=handlers)
        log.info("accelerator: %s, %d process(es), device %s", _ACCELERATOR.distributed_type,
                 _ACCELERATOR.num_processes, _ACCELERATOR.device)
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


# ---------------------------------------------------------------------------------------------------------
# Models

class PolicyAndValue(nn.Module):
    """Actor and critic as one module, so that DeepSpeed trains both in one engine with one optimizer.

    accelerate prepares one DeepSpeed engine per ``prepare`` call (without several plugins), and PPO
    updates both networks from one loss. ``policy`` is a causal LM (its output has ``.logits``, or it
    returns the logits tensor); ``value`` maps ``(input_ids, attention_mask)`` to per-token values.
    """

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, values_only: bool = False,
                **policy_kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(logits, values)``; with ``values_only`` the policy does not run and the logits are None."""
        logits = None
        if not values_only:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, **policy_kwargs)
            logits = getattr(out, "logits", out)
        return logits, self.value(input_ids=input_ids, attention_mask=attention_mask)


def prepare_trainable(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: Any | None = None, micro_batch_size: int | None = None,
                      max_grad_norm: float | None = None) -> tuple:
    """``accelerator.prepare`` the trained module with its optimizer (and scheduler): DDP or a DeepSpeed engine.

    Returns ``(model, optimizer)`` or ``(model, optimizer, scheduler)``. Pass a plain torch optimizer
    (DeepSpeed then wraps it; DeepSpeed-named optimizers compile extra native ops). Stages that shard
    batches themselves prepare no dataloader, so when the DeepSpeed config leaves
    ``train_micro_batch_size_per_gpu`` at ``"auto"`` it is set from ``micro_batch_size`` (DeepSpeed
    needs a number for its batch bookkeeping). Call once per job for PPO: wrap actor and critic in
    :class:`PolicyAndValue` first.

    Gradient clipping: outside DeepSpeed the stage clips as usual (``accelerator.clip_grad_norm_`` when
    ``accelerator.sync_gradients``); under DeepSpeed that call only reports the norm and the engine
    clips inside its step at the config's ``gradient_clipping``, which DeepSpeed defaults to 1.0 when
    absent. ``max_grad_norm`` (0 = off) is therefore written into the DeepSpeed config, so both paths
    clip at the stage's value.
    """
    config = deepspeed_config(accelerator)
    if config is not None:
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            if micro_batch_size is None:
                raise ValueError("DeepSpeed config has train_micro_batch_size_per_gpu='auto': pass micro_batch_size")
            config["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
        if max_grad_norm is not None:
            previous = config.get("gradient_clipping", "auto")
            if previous not in ("auto", max_grad_norm):
                log.warning("DeepSpeed gradient_clipping %s replaced by the stage's max_grad_norm %s",
                            previous, max_grad_norm)
            config["gradient_clipping"] = float(max_grad_norm)
    parts = [model, optimizer] + ([scheduler] if scheduler is not None else [])
    return tuple(accelerator.prepare(*parts))


def frozen_zero3_config(ds_config: dict, offload: bool = False) -> dict:
    """DeepSpeed config for a frozen (inference-only) model sharded with ZeRO-3, derived from the job's.

    Keeps the precision sections and the ZeRO-3 tuning keys; drops the optimizer, scheduler and optimizer
    offload (no optimizer exists), accumulation is 1, and ``offload`` moves the shards to CPU memory
    (``offload_param``) for roles that are only read now and then (reference and reward models).
    """
    zero = {k: copy.deepcopy(v) for k, v in ds_config.get("zero_optimization", {}).items()
            if k not in ("offload_optimizer", "offload_param")}
    zero["stage"] = 3
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    micro = ds_config.get("train_micro_batch_size_per_gpu", 1)
    config: dict = {
        "train_micro_batch_size_per_gpu": micro if isinstance(micro, int) else 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
    }
    for key in ("bf16", "fp16", "steps_per_print", "wall_clock_breakdown"):
        if key in ds_config:
            config[key] = copy.deepcopy(ds_config[key])
    return config


def prepare_frozen(model: nn.Module, accelerator, offload: bool = False) -> nn.Module:
    """Place a model that is only evaluated (reference policy, reward model) for this job, in eval mode.

    Under DeepSpeed ZeRO-3 its parameters are sharded across ranks with a DeepSpeed inference engine
    (:func:`frozen_zero3_config`; ``offload`` keeps the shards in CPU memory); forward passes are then
    collective, so every rank must run the same number of them. Otherwise (one process, DDP, ZeRO 1/2)
    each rank holds a full copy on its device and ``offload`` is ignored. The returned module is called
    like the original; its gradients are off.
    """
    model.requires_grad_(False)
    if zero_stage(accelerator) == 3:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=frozen_zero3_config(deepspeed_config(accelerator), offload))
        engine.eval()
        return engine
    return model.to(accelerator.device).eval()


def is_zero3(model: nn.Module) -> bool:
    """True if ``model`` is a DeepSpeed engine whose parameters are ZeRO-3 partitioned."""
    stage = getattr(model, "zero_optimization_stage", None)
    return callable(stage) and stage() == 3


def unwrap(model: nn.Module, accelerator) -> nn.Module:
    """The user's module inside a DDP wrapper or DeepSpeed engine (identity for a plain module)."""
    inner = getattr(model, "module", None)
    if inner is not None and hasattr(model, "zero_optimization_stage"):
        return inner  # a DeepSpeed engine made by prepare_frozen: accelerate does not know it
    if inner is None and not hasattr(model, "_orig_mod"):
        # Trick (speed): a plain module is its own inner module; accelerate's unwrap would import
        # DeepSpeed on first use (about a second, inside the training loop) only to find that out.
        return model
    return accelerator.unwrap_model(model)


def _zero3_offload(engine) -> Any:
    """The object that owns a ZeRO-3 engine's parameter fetch/release hooks."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        raise RuntimeError("ZeRO-3 engine has no optimizer/parameter-offload object")
    return getattr(optimizer, "parameter_offload", optimizer)


def _remove_zero3_hooks(engine) -> None:
    # With the full weights gathered, ZeRO-3's per-module hooks would still release (re-partition) each
    # module's weights after its forward, and re-fetch them for every generated token.
    offload = _zero3_offload(engine)
    for param in offload.module.parameters(recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in list(offload.forward_hooks) + list(offload.backward_hooks):
        hook.remove()
    offload.forward_hooks = []
    offload.backward_hooks = []


def _restore_zero3_hooks(engine) -> None:
    offload = _zero3_offload(engine)
    coordinator = getattr(offload, "param_coordinator", None)
    if coordinator is not None and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # the recorded module order no longer matches
    offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module, accelerator, gather: bool = True) -> Iterator[nn.Module]:
    """Yield the plain module to call ``generate()`` on (works for prepared and frozen models).

    Under ZeRO-3 with ``gather=True`` the full weights are gathered on every rank once for the whole
    block (memory: one full copy per rank) and ZeRO's hooks are lifted, so generation runs at
    single-model speed; ranks may then generate different numbers of tokens. With ``gather=False``
    the weights stay sharded and each forward gathers them layer by layer (slow, low memory): every
    rank must run the same number of forward passes, so call ``train.generation.generate(..., synced=True)``
    or ``model.generate(..., synced_gpus=True)`` (see :func:`generation_kwargs`). Outside ZeRO-3 this is just the unwrapped module. Collective under
    ZeRO-3: every rank must enter the block.
    """
    inner = unwrap(model, accelerator)
    checkpointing = bool(getattr(inner, "is_activation_checkpointing", False))
    if checkpointing:
        inner.activation_checkpointing_disable()  # generation caches keys/values; checkpointing forbids it
    try:
        if is_zero3(model) and gather:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                _remove_zero3_hooks(model)
                try:
                    yield inner
                finally:
                    _restore_zero3_hooks(model)
        else:
            yield inner
    finally:
        if checkpointing:
            inner.activation_checkpointing_enable()


def generation_kwargs(model: nn.Module, accelerator, gather: bool = True) -> dict:
    """Extra ``generate()`` arguments that :func:`gathered_for_generation` needs for ``model``."""
    if is_zero3(model) and not gather and accelerator.num_processes > 1:
        return {"synced_gpus": True}
    return {}


# ---------------------------------------------------------------------------------------------------------
# Saving

def full_state_dict(model: nn.Module, accelerator) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict of a prepared or frozen model. Collective under ZeRO-3.

    ZeRO-3: on the main process the consolidated weights (``accelerator.get_state_dict`` when the config
    sets ``stage3_gather_16bit_weights_on_model_save``, else gathered here), ``None`` on other ranks.
    Otherwise: the unwrapped module's state dict on every rank.
    """
    if not is_zero3(model):
        return unwrap(model, accelerator).state_dict()
    if model.zero_gather_16bit_weights_on_model_save():
        state = accelerator.get_state_dict(model)
        return state if accelerator.is_main_process else None
    import deepspeed

    inner = unwrap(model, accelerator)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if not accelerator.is_main_process:
            return None
        return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}


def save_on_main(fn: Callable[[], T], accelerator) -> T | None:
    """Run ``fn`` on the main process only, between two barriers; its result on main, ``None`` elsewhere.

    The first barrier makes sure every rank finished the step that produced what is saved; the second
    that no rank reads the files (or exits) before they exist.
    """
    accelerator.wait_for_everyone()
    result = fn() if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return result


def save_full(model: nn.Module, accelerator, save: Callable[[nn.Module], Any]) -> None:
    """Call ``save(module)`` on the main process with the full weights in ``module``. Collective.

    ``save`` is the stage's usual single-process writer (``train.models.save_model``,
    ``RewardModel.save_pretrained``...), so the folder is the same plain safetensors folder a
    one-process run writes. Under ZeRO-3 the weights are gathered for the call (read only: changes made
    by ``save`` are discarded; a writer that restructures the module, such as merging LoRA, must run on
    a copy).
    """
    inner = unwrap(model, accelerator)
    if not is_zero3(model):
        save_on_main(lambda: save(inner), accelerator)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        save_on_main(lambda: save(inner), accelerator)


@contextlib.contextmanager
def whole_weights(accelerator):
    """Build models with their full weights on every process, even under ZeRO-3.

    accelerate makes ``from_pretrained`` partition weights while loading under ZeRO-3 (``zero.Init``);
    PPO copies the RM into the critic and hands each model to its own engine, and a main-process-only
    stage cannot join a collective partitioned load: both need whole (not partitioned) parameters. Each process briefly holds full copies until ``prepare``."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()  # transformers reads ZeRO-3 from this global; accelerate set it
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
