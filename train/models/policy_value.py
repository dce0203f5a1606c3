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
                **policy_kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(logits, values)``; with ``values_only`` the policy does not run and the logits are None."""
        logits = None
        if not values_only:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, **policy_kwargs)
            logits = getattr(out, "logits", out)
        return logits, self.value(input_ids=input_ids, attention_mask=attention_mask)
