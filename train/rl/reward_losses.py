"""Reward-model losses (pure): pairwise Bradley-Terry and listwise Plackett-Luce, plus pairwise accuracy.

Each loss comes as a mean and as a ``(sum, count)`` pair: the training stages backpropagate a sum over
this process's items divided by the GLOBAL count, so N processes follow one process's trajectory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_w - r_l)``, computed as ``softplus(r_l - r_w)`` (no overflow)."""
    return F.softplus(r_l - r_w).mean()


def pairwise_loss_sum(r_w: torch.Tensor, r_l: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of ``-log sigmoid(r_w - r_l)`` and the number of pairs (for a mean over ranks)."""
    return F.softplus(r_l - r_w).sum(), int(r_w.numel())


def pairwise_accuracy(r_w, r_l) -> float:
    """Fraction of pairs with ``r_w > r_l`` strictly (a tie counts as a miss)."""
    r_w = torch.as_tensor(r_w)
    r_l = torch.as_tensor(r_l)
    if r_w.numel() == 0:
        raise ValueError("pairwise_accuracy of zero pairs")
    return float((r_w > r_l).float().mean())


def listwise_loss(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood of the order given (column 0 best), masked.

    For one list with real items ``s_1..s_n`` in the given order,
    ``NLL = sum_i [logsumexp(s_i..s_n) - s_i]``. Masked entries (padding) take no part in any term.
    The result is the mean NLL over lists with at least two real items (for two items it equals
    ``pairwise_loss``)."""
    total, count = listwise_loss_sum(scores, mask)
    return total / count if count else total


def listwise_loss_sum(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of the Plackett-Luce NLLs of the lists with at least two real items, and their number
    (:func:`listwise_loss` is their mean; a sum over ranks / a global count gives the same mean)."""
    if scores.shape != mask.shape or scores.ndim != 2:
        raise ValueError("scores and mask must both be (groups, items); "
                         f"got {tuple(scores.shape)}, {tuple(mask.shape)}")
    real = mask.to(torch.bool)
    neg_inf = torch.finfo(scores.dtype).min
    masked = scores.masked_fill(~real, neg_inf)
    # logsumexp over each item and every item after it: a reversed cumulative logsumexp.
    tail = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    terms = torch.where(real, tail - scores, torch.zeros_like(scores))
    per_list = terms.sum(dim=-1)
    counted = real.sum(dim=-1) >= 2
    if not bool(counted.any()):
        return scores.sum() * 0.0, 0  # keeps the graph; no list to learn from
    return per_list[counted].sum(), int(counted.sum())
