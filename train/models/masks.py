"""Attention-mask arithmetic shared by every model role (pure functions on mask tensors)."""
from __future__ import annotations

import torch


def last_token_index(attention_mask: torch.Tensor, allow_empty: bool = False) -> torch.Tensor:
    """Index ``(B,)`` of the last real (mask 1) position of each row: correct for left and right padding.

    ``argmax`` over ``position * mask`` is the highest masked-in position whatever side the padding is
    on. A row with no real token gives 0 with ``allow_empty`` (PPO's empty answers: the caller masks
    them), and raises otherwise (a reward read from padding is a caller's bug)."""
    mask = attention_mask.to(torch.long)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, time), got shape {tuple(mask.shape)}")
    if not allow_empty and not bool((mask.sum(dim=1) > 0).all()):
        raise ValueError("every row needs at least one real token (attention_mask all zero)")
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return (positions * mask).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row sees the same positions as the
    same text right-padded (absolute position embeddings would otherwise shift with the padding)."""
    mask = attention_mask.to(torch.long)
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def first_shared_column(attention_mask: torch.Tensor) -> int:
    """The first column that is real (mask 1) in at least one row: the columns before it are left
    padding in every row, which a batch may drop (0 when no column is real)."""
    return int(attention_mask.any(0).to(torch.int8).argmax()) if attention_mask.numel() else 0
