"""The PPO critic: per-token values from a copy of the reward model.

Initialising the critic from the reward model (same backbone weights; the value head starts as the
RM head with its normaliser folded in) is the usual RLHF choice: at step 0 the critic already reads
the features the reward is a function of, and its value at every token starts as "the normalised
reward if the answer stopped here", on the same scale as the returns it must regress to.

Saved folder (atomic)::

    config.json, model.safetensors   the backbone (``save_pretrained``, safetensors)
    value_head.safetensors            the Linear(hidden, 1) value head
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selfrank.errors import UserError

from selfrank.atomic import atomic_folder
from selfrank.train.models.reward_model import RewardModel, disable_dropout
from selfrank.train.models.masks import position_ids_from_mask

HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """``V(prefix)`` for every position: backbone hidden states -> Linear(hidden, 1) -> ``(B, T)``."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head
        disable_dropout(self.backbone)
        self._takes_positions = "position_ids" in inspect.signature(backbone.forward).parameters

    @classmethod
    def from_reward_model(cls, rm: RewardModel) -> "ValueModel":
        """A critic with its own copy of the RM's weights; the head is gain * head(h) + bias folded
        into one Linear so the initial values equal the RM's normalised reward at each token."""
        backbone = copy.deepcopy(rm.backbone)
        head = nn.Linear(rm.head.in_features, 1).to(rm.head.weight.device, rm.head.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(rm.head.weight * rm.gain)
            head.bias.copy_(rm.head.bias * rm.gain + rm.bias)
        return cls(backbone, head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values ``(B, T)`` in float32; ``values[:, t]`` reads the prefix ending at token t."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._takes_positions:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        hidden = self.backbone(**kwargs).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write backbone and head to ``folder`` atomically (safetensors only)."""
        with atomic_folder(Path(folder)) as tmp:
            self.backbone.save_pretrained(tmp)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                      str(tmp / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path, model_cfg=None) -> "ValueModel":
        from transformers import AutoModel

        folder = Path(folder)
        if not (folder / HEAD_FILE).is_file():
            raise UserError(f"{folder}: not a value model folder (missing {HEAD_FILE})")
        kwargs = {"trust_remote_code": bool(getattr(model_cfg, "trust_remote_code", False))}
        if model_cfg is not None:
            kwargs["dtype"] = getattr(torch, model_cfg.dtype)
        backbone = AutoModel.from_pretrained(str(folder), **kwargs)
        state = load_file(str(folder / HEAD_FILE))
        head = nn.Linear(state["weight"].shape[1], 1).to(state["weight"].dtype)
        head.load_state_dict(state)
        return cls(backbone, head)
