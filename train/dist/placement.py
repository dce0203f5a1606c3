"""Model placement: where each role's weights live and how they are gathered (DDP or DeepSpeed ZeRO).

* :func:`prepare_trainable`: the trained module and its optimizer (DDP wrapper or DeepSpeed engine);
* :func:`prepare_frozen`: reference / reward models (ZeRO-3 inference engines under ZeRO-3, optionally
  offloaded to CPU memory; a full copy per rank otherwise);
* :func:`gathered_for_generation`: full weights for fast generation under ZeRO-3;
* :func:`full_state_dict` / :func:`save_full`: plain, unsharded weights for checkpoints and saved folders;
* :func:`whole_weights`: build models unpartitioned even under ZeRO-3.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

from selfrank.train.dist.collectives import deepspeed_config, save_on_main, uses_deepspeed, zero_stage
from selfrank.train.precision import check_trainable_dtype

log = logging.getLogger(__name__)

__all__ = ["prepare_trainable", "frozen_zero3_config", "prepare_frozen", "autocast_forward", "is_zero3", "unwrap", "gathered_for_generation", "generation_kwargs", "full_state_dict", "save_full", "whole_weights"]

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

    Precision (``train/precision.py``): trainable 16-bit weights are refused unless DeepSpeed runs in
    bf16/fp16 (its optimizer then keeps float32 master weights); with accelerate's mixed precision the
    module's forward runs under autocast.
    """
    deepspeed_mixed = uses_deepspeed(accelerator) and accelerator.mixed_precision != "no"
    check_trainable_dtype(model.parameters(), deepspeed_mixed=deepspeed_mixed)
    if deepspeed_mixed and zero_stage(accelerator) == 3:
        _join_zero3_dtype(model, {"bf16": torch.bfloat16, "fp16": torch.float16}[accelerator.mixed_precision])
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


def _join_zero3_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Give parameters created outside ``zero.Init`` (a reward or value head on a backbone that was loaded
    partitioned, hence already 16-bit) the engine's 16-bit dtype: DeepSpeed casts a module only when none
    of it is partitioned, and its ZeRO-3 optimizer needs one dtype for all parameters."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return  # DeepSpeed casts the whole module itself
    for param in model.parameters():
        if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


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

    It computes as the trained module does (``model.mixed_precision``): under autocast with accelerate's
    mixed precision, in DeepSpeed's 16-bit dtype under DeepSpeed bf16/fp16 (the ZeRO-3 engine casts it
    itself), so that a reference equal to the actor gives exactly the actor's log-probs (KL 0 at the start).
    """
    model.requires_grad_(False)
    if zero_stage(accelerator) == 3:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=frozen_zero3_config(deepspeed_config(accelerator), offload))
        engine.eval()
        return engine
    model = model.to(accelerator.device)
    if uses_deepspeed(accelerator) and accelerator.mixed_precision != "no":
        # As DeepSpeed casts the trained module: parameters to 16 bits, float32 buffers kept (e.g. the
        # reward model's normaliser).
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[accelerator.mixed_precision]
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    return autocast_forward(model, accelerator).eval()


def autocast_forward(module: nn.Module, accelerator) -> nn.Module:
    """``module`` with its forward under the job's autocast (accelerate's mixed precision; identity
    otherwise), as ``prepare`` does for the trained module. For frozen models and views that are not
    prepared (the LoRA actor with its adapters off). Outputs come back in float32."""
    if not getattr(accelerator, "native_amp", False) or getattr(module, "_selfrank_autocast", False):
        return module
    from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

    autocast = get_mixed_precision_context_manager(True, accelerator.autocast_handler)
    module.forward = convert_outputs_to_fp32(autocast(module.forward))  # what accelerate's prepare does
    module._selfrank_autocast = True
    return module


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
    rank must run the same number of forward passes, so call ``sampling.generation.generate(..., synced=True)``
    or ``model.generate(..., synced_gpus=True)`` (see :func:`generation_kwargs`). Outside ZeRO-3 this is just the unwrapped module. Collective under
    ZeRO-3: every rank must enter the block.
    """
    from selfrank.train.scale import activation_checkpointing_off

    inner = unwrap(model, accelerator)
    # Generation caches keys/values, which activation checkpointing forbids; it also runs under the job's
    # autocast (the bare module's forward has none), so sampling computes as the trained forward does.
    with activation_checkpointing_off(inner), accelerator.autocast():
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


def save_full(model: nn.Module, accelerator, save: Callable[[nn.Module], Any]) -> None:
    """Call ``save(module)`` on the main process with the full weights in ``module``. Collective.

    ``save`` is the stage's usual single-process writer (``train.models.causal_lm.save_model``,
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
