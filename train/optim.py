"""Optimizer construction shared by the training stages."""
from __future__ import annotations

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
