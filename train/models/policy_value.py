"""Actor and critic as one module (PPO's trained unit)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
                policy_only: bool = False, **policy_kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(logits, values)``; with ``values_only`` the policy does not run and the logits are None,
        with ``policy_only`` the critic does not run and the values are None."""
        if values_only and policy_only:
            raise ValueError("values_only and policy_only exclude each other")
        logits = values = None
        if not values_only:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, **policy_kwargs)
            logits = getattr(out, "logits", out)
        if not policy_only:
            values = self.value(input_ids=input_ids, attention_mask=attention_mask)
        return logits, values
