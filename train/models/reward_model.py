"""The reward model: a transformer backbone with a scalar head read at the last real token.

The backbone is the base transformer of a causal LM (for GPT-2, ``GPT2LMHeadModel.transformer``), so
the SFT model's weights start the reward model and PPO can build its critic from the same backbone
(``backbone_hidden`` gives the per-token states a value head needs). Dropout is switched off: a reward
must be a deterministic function of the text, in training as in scoring.

Saved folder (written atomically: a temporary sibling folder renamed into place)::

    config.json, model.safetensors      a one-label sequence classifier: the backbone and the head
                                        with the gain folded in (``AutoModelForSequenceClassification``
                                        loads it; see ``train.models.reward_interop``)
    tokenizer files                     the tokenizer the rewards were learned with (right padding)
    reward_head.safetensors             the scalar head and the normaliser buffers, as trained
    reward_config.json                  normaliser (gain, bias), pooling, source
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selfrank.atomic import write_json
from selfrank.errors import UserError

from selfrank.train.models.masks import last_token_index, position_ids_from_mask
from selfrank.atomic import atomic_folder
from selfrank.train.models.causal_lm import encode_prompt_response, load_model
from selfrank.train.models.reward_interop import is_classifier_folder, save_classifier

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"
POOLING = "last_token"
FORMAT_VERSION = 1


def disable_dropout(module: nn.Module) -> None:
    """Zero every dropout probability, in the modules and in the config (so reloads stay off too)."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
    config = getattr(module, "config", None)
    if config is not None:
        for name, value in list(vars(config).items()):
            if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
                setattr(config, name, 0.0)


def _hidden_size(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise UserError(f"reward.backbone: cannot find the hidden size of a {type(config).__name__}")


class RewardModel(nn.Module):
    """``r(prompt, response)``: backbone -> hidden state of the last real token -> Linear(hidden, 1).

    ``forward`` returns raw rewards; ``normalized(raw)`` applies the affine normaliser (``gain``,
    ``bias`` buffers) fitted so that the reference policy's samples score mean 0, std 1.
    ``tokenizer`` (optional) travels with the model so that a saved folder is self-contained.
    """

    def __init__(self, backbone: nn.Module, tokenizer=None, source: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.source = source
        hidden = _hidden_size(backbone.config)
        self.head = nn.Linear(hidden, 1)
        # Small init (the backbone's own initializer range, GPT-2: 0.02): rewards start near 0 for
        # every text, so the first gradients come from the data, not from a random ordering in the head.
        std = float(getattr(backbone.config, "initializer_range", 0.02) or 0.02)
        nn.init.normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("gain", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))
        disable_dropout(self.backbone)
        # Not every architecture accepts position ids; those that do need them for left padding.
        self._takes_positions = "position_ids" in inspect.signature(backbone.forward).parameters

    # ---- forward -------------------------------------------------------------------------------
    def backbone_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token last hidden states ``(B, T, H)`` (what a per-token value head reads)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._takes_positions:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        return self.backbone(**kwargs).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw rewards ``(B,)`` in float32, read at each row's last real token."""
        hidden = self.backbone_hidden(input_ids, attention_mask)
        index = last_token_index(attention_mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()

    def normalized(self, rewards: torch.Tensor) -> torch.Tensor:
        return rewards * self.gain + self.bias

    def set_normalizer(self, gain: float, bias: float) -> None:
        self.gain.fill_(float(gain))
        self.bias.fill_(float(bias))

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Write the whole reward model to ``folder`` atomically (safetensors only, no pickle)."""
        with atomic_folder(Path(folder)) as tmp:
            save_classifier(self, tmp)
            if self.tokenizer is not None:
                # Right padding: what a sequence classifier's default positions (0 from the left) assume;
                # this project's own scoring passes positions and works with either side.
                side = self.tokenizer.padding_side
                self.tokenizer.padding_side = "right"
                try:
                    self.tokenizer.save_pretrained(tmp)
                finally:
                    self.tokenizer.padding_side = side
            tensors = {f"head.{name}": t.detach().cpu().contiguous() for name, t in self.head.state_dict().items()}
            tensors["normalizer.gain"] = self.gain.detach().cpu().reshape(1).float()
            tensors["normalizer.bias"] = self.bias.detach().cpu().reshape(1).float()
            save_file(tensors, str(tmp / HEAD_FILE))
            write_json(tmp / CONFIG_FILE, {
                "format": FORMAT_VERSION,
                "pooling": POOLING,
                "gain": float(self.gain),
                "bias": float(self.bias),
                "source": self.source,
                "hidden_size": int(self.head.in_features),
            })

    @classmethod
    def from_pretrained(cls, folder: str | Path, model_cfg=None) -> "RewardModel":
        """Load a folder written by ``save_pretrained`` (with its tokenizer, as ``.tokenizer``)."""
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file() or not (folder / HEAD_FILE).is_file():
            raise UserError(f"{folder}: not a reward model folder (missing {CONFIG_FILE} or {HEAD_FILE})")
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        if meta.get("pooling") != POOLING:
            raise UserError(f"{config_path}: pooling {meta.get('pooling')!r} is not supported (expected {POOLING!r})")
        trust = bool(getattr(model_cfg, "trust_remote_code", False))
        kwargs = {"trust_remote_code": trust}
        if model_cfg is not None:
            kwargs["dtype"] = getattr(torch, model_cfg.dtype)
        if is_classifier_folder(folder):
            backbone = AutoModelForSequenceClassification.from_pretrained(str(folder), **kwargs).base_model
        else:  # the earlier layout: the bare backbone
            backbone = AutoModel.from_pretrained(str(folder), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
        model = cls(backbone, tokenizer=tokenizer, source=meta.get("source"))
        tensors = load_file(str(folder / HEAD_FILE))
        model.head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        model.set_normalizer(float(tensors["normalizer.gain"][0]), float(tensors["normalizer.bias"][0]))
        model.eval()
        return model

    @classmethod
    def from_causal_lm(cls, folder_or_model, tokenizer=None, model_cfg=None) -> "RewardModel":
        """A fresh reward model on the base transformer of a causal LM (folder or loaded model).

        A loaded model's base transformer is taken over, not copied (its dropout is switched off too);
        pass a copy to keep the language model independent."""
        if isinstance(folder_or_model, (str, Path)):
            lm, loaded_tokenizer = load_model(Path(folder_or_model), model_cfg)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
            source = str(folder_or_model)
        else:
            lm = folder_or_model
            source = getattr(lm.config, "_name_or_path", None) or type(lm).__name__
        backbone = lm.base_model
        if backbone is lm:
            raise UserError(f"reward.backbone: {type(lm).__name__} has no separate base transformer")
        return cls(backbone, tokenizer=tokenizer, source=source)


def pad_batch(sequences: list[list[int]], pad_id: int,
              padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into ``(input_ids, attention_mask)``, padded on ``padding_side``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            raise ValueError("cannot score an empty token sequence")
        span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each ``prompt + response + EOS`` (the text the reward is read from)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [encode_prompt_response(tokenizer, p, r, max_length, add_eos=True)[0] for p, r in zip(prompts, responses)]


def model_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def score(rm: RewardModel, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 32,
          max_length: int = 256, normalized: bool = True) -> np.ndarray:
    """Rewards of ``(prompt, response)`` pairs as float32 ``(n,)``; normalised unless told otherwise.

    Sequences are sorted by length so that each batch pads little; results come back in input order."""
    sequences = encode_pairs(tokenizer, prompts, responses, max_length)
    out = np.zeros(len(sequences), dtype=np.float32)
    if not sequences:
        return out
    was_training = rm.training
    rm.eval()
    device = model_device(rm)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    side = getattr(tokenizer, "padding_side", "left") or "left"
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids, mask = pad_batch([sequences[i] for i in chunk], tokenizer.pad_token_id, side)
            rewards = rm(ids.to(device), mask.to(device))
            if normalized:
                rewards = rm.normalized(rewards)
            out[chunk] = rewards.float().cpu().numpy()
    finally:
        rm.train(was_training)
    return out


# ---- batches of encoded items (training and the online refresher) ------------------------------
def batch_rewards(rm: RewardModel, tokenizer, batch: list[list[list[int]]]) -> torch.Tensor:
    """Raw rewards of every sequence of every item, flattened in order, in one forward pass."""
    flat = [ids for item in batch for ids in item]
    ids, mask = pad_batch(flat, tokenizer.pad_token_id, tokenizer.padding_side or "left")
    device = model_device(rm)
    return rm(ids.to(device), mask.to(device))


def pairwise_rewards(rm: RewardModel, tokenizer,
                      batch: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_w, r_l)`` for a batch of ``[winner_ids, loser_ids]`` items."""
    rewards = batch_rewards(rm, tokenizer, batch)
    return rewards[0::2], rewards[1::2]


def listwise_scores(rm: RewardModel, tokenizer,
                     batch: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every text of every list, laid out ``(groups, max_items)`` with a mask."""
    rewards = batch_rewards(rm, tokenizer, batch)
    width = max(len(item) for item in batch)
    scores = torch.zeros((len(batch), width), dtype=rewards.dtype, device=rewards.device)
    item_mask = torch.zeros((len(batch), width), dtype=torch.bool, device=rewards.device)
    offset = 0
    for row, item in enumerate(batch):
        scores[row, :len(item)] = rewards[offset:offset + len(item)]
        item_mask[row, :len(item)] = True
        offset += len(item)
    return scores, item_mask
