"""Switches for training larger models: activation (gradient) checkpointing and the attention kernel.

Both act on every Hugging Face model inside a module (a causal LM, a reward model's or critic's backbone,
PPO's actor + critic), so the stages apply them once to what they train:

* ``model.gradient_checkpointing``: each transformer block's activations are recomputed in the backward
  pass instead of kept (non-reentrant checkpointing, which works with DDP, ZeRO-2/3 and LoRA). Generation
  switches it off for its block (:func:`activation_checkpointing_off`), as cached keys/values need it off.
* ``model.attn_implementation``: ``sdpa`` (default), ``eager`` or ``flash_attention_2``; the last is
  refused with one line where the flash-attn package or a CUDA GPU is missing.
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterator

import torch
from torch import nn

from selfrank.errors import UserError

__all__ = ["hf_models", "check_attn_implementation", "apply_model_switches", "activation_checkpointing_off"]


def hf_models(module: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face ``PreTrainedModel`` instances inside ``module`` (itself included)."""
    from transformers import PreTrainedModel

    found, inside = [], set()
    for sub in module.modules():  # pre-order: an outer model comes before the models it contains
        if id(sub) in inside:
            continue
        if isinstance(sub, PreTrainedModel):
            found.append(sub)
            inside.update(id(m) for m in sub.modules())
    return found


def check_attn_implementation(name: str) -> None:
    """Refuse an attention kernel that cannot run here (one line, before any model is touched)."""
    if name != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError("model.attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
                        "installed (pip install flash-attn on a CUDA machine); use sdpa")
    if not torch.cuda.is_available():
        raise UserError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa")


def apply_model_switches(module: nn.Module, model_cfg) -> nn.Module:
    """Set ``model_cfg.attn_implementation`` and ``model_cfg.gradient_checkpointing`` on every Hugging Face
    model inside ``module`` (before ``prepare``); returns ``module``."""
    check_attn_implementation(model_cfg.attn_implementation)
    for model in hf_models(module):
        if model.config._attn_implementation != model_cfg.attn_implementation:
            try:
                model.set_attn_implementation(model_cfg.attn_implementation)
            except (ValueError, ImportError) as exc:
                raise UserError(f"model.attn_implementation: {type(model).__name__} cannot use "
                                f"{model_cfg.attn_implementation} ({str(exc).splitlines()[0]})") from None
        if model_cfg.gradient_checkpointing:
            if not model.supports_gradient_checkpointing:
                raise UserError(f"model.gradient_checkpointing: {type(model).__name__} does not support it; "
                                "set it to false")
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return module


@contextlib.contextmanager
def activation_checkpointing_off(module: nn.Module) -> Iterator[None]:
    """Switch activation checkpointing off in every Hugging Face model of ``module`` for the block."""
    switched = [m for m in hf_models(module) if m.is_activation_checkpointing]
    for model in switched:
        model.activation_checkpointing_disable()
    try:
        yield
    finally:
        for model in switched:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
