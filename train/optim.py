"""Optimizer construction shared by the training stages."""
from __future__ import annotations

import math

import torch


def adamw(module: torch.nn.Module, lr: float, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused into one kernel when the device supports it (a few ms per step on small models)."""
    return adamw_groups([(module, lr)], **kwargs)


def adamw_groups(groups: list[tuple[torch.nn.Module, float]], fused: bool = True, **kwargs) -> torch.optim.AdamW:
    """One AdamW over several modules, one parameter group (with its own learning rate) per module.

    AdamW's update is per parameter, so this equals one optimizer per module. ``fused`` picks the fused
    kernel when every parameter allows it (not under DeepSpeed, which steps flattened partitions)."""
    param_groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": lr} for module, lr in groups]
    params = [p for group in param_groups for p in group["params"]]
    fusable = fused and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                            and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(param_groups, lr=groups[0][1], fused=fusable or None, **kwargs)


def lr_factor(step: int, total: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning-rate multiplier of 1-based optimizer step ``step`` out of ``total``.

    Warm-up: ``step / warmup`` for the first ``warmup`` steps (the first step is not wasted at 0). Then
    ``constant`` stays at 1; ``linear`` and ``cosine`` decay over the remaining steps towards 0, which
    the step after the last would reach (the last step still learns). A pure function of the step, so
    a resumed run continues the schedule exactly."""
    if step < 1 or total < 1:
        raise ValueError(f"step and total must be >= 1, got {step} and {total}")
    if step <= warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - 1 - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def set_learning_rates(optimizer, base_lrs: list[float], factor: float) -> None:
    """Set each parameter group's learning rate to its base rate times ``factor`` (works through
    accelerate's and DeepSpeed's optimizer wrappers, which share the groups)."""
    groups = optimizer.param_groups
    if len(groups) != len(base_lrs):
        raise ValueError(f"{len(base_lrs)} base learning rates for {len(groups)} parameter groups")
    for group, base in zip(groups, base_lrs):
        group["lr"] = base * factor
