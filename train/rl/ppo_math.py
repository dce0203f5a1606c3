"""Pure PPO-for-LM maths: log-probs, masked statistics, KL penalty, GAE, clipped losses, KL control.

Every function takes plain tensors and returns tensors; nothing here touches a model or an optimiser,
so each can be checked by hand. Conventions shared by all functions:

- response tensors are ``(B, R)`` and right-padded; ``mask`` is 1 for real response tokens (the EOS
  included) and 0 for padding;
- ``logp[:, t]`` is log pi(response_t | query, response_<t) and ``values[:, t]`` is the critic's value
  of the state just before response_t is emitted.

The tricks follow "The N+ implementation details of RLHF with PPO" (Huang et al., 2024) and
Ziegler et al. (2019); each is named where it is used.
"""
from __future__ import annotations

import math

import torch

from selfrank.train.models.masks import last_token_index


def logprobs_from_logits(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of ``ids`` under ``softmax(logits / temperature)``; shapes ``(B, T, V)``, ``(B, T)``.

    Trick: the log-probs are recomputed with the SAMPLING temperature. Samples come from
    softmax(logits / T), so the ratio pi_new / pi_old and the KL to the reference must use the same
    distribution, otherwise the policy gradient is for a different policy than the one that acted.
    Computed as gathered logit minus logsumexp so that no full (B, T, V) log-softmax is kept.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    picked = torch.gather(scaled, -1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last axis: ``logsumexp(z) - sum(p * z)``."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (over all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError("masked_var: need at least two unmasked values for an unbiased variance")
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise ``x`` to unit variance over the masked positions; zero mean unless ``shift_mean`` is
    False (then the original mean is kept: reward whitening must not change the reward's sign)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

    ``k1`` = log pi - log pi_ref (unbiased; the paper's log(pi/pi_SFT) term). ``k3`` =
    (r - 1) - log r with r = pi_ref / pi (unbiased, never negative, lower variance; Schulman's note
    "Approximating KL divergence").
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def compute_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float, estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards ``(B, R)``: ``-kl_coef * KL_t`` on every real token, plus the sequence score
    on the last real token (Ziegler et al.: the RM scores the whole answer once, the KL penalty is dense).
    Padding positions get 0."""
    mask_f = mask.to(logp.dtype)
    rewards = -kl_coef * per_token_kl(logp, ref_logp, estimator) * mask_f
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    # A row with no real token carries no score (nothing was said to be scored).
    has_token = mask_f.sum(-1) > 0
    rewards[rows, last_token_index(mask, allow_empty=True)] += torch.where(has_token, score.to(rewards.dtype), 0.0)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded sequences -> ``(advantages, returns)``.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}. The value after the
    last real token is 0 (the episode ends there), which masking the padded values achieves. Returns
    are A + V (the critic's regression target); both outputs are 0 on padding.
    """
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    rewards = rewards * mask_f
    length = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1) * mask_f
    returns = (advantages + values) * mask_f
    return advantages, returns


def policy_loss_terms(new_logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                      clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate -> ``(loss, clipped, half_sq_log_ratio)``, all ``(B, R)``.

    loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)) (the pessimistic bound);
    clipped_t = 1.0 where the clipped term was the larger; half_sq_log_ratio_t = 0.5 * (log ratio_t)^2.
    Per-token values let a distributed update sum them over its rows and divide by the GLOBAL token
    count (:func:`policy_loss` is their masked mean over one batch).
    """
    log_ratio = new_logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        clipped_frac = (clipped > unclipped).to(loss.dtype)
        half_sq = 0.5 * log_ratio.detach() ** 2
    return loss, clipped_frac, half_sq


def policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate -> ``(loss, clipfrac, approx_kl)``.

    loss = mean over real tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) (the pessimistic
    bound); clipfrac = share of tokens where the clipped term was the larger; approx_kl =
    0.5 * mean((log ratio)^2), a cheap estimate of how far the update moved the policy.
    """
    loss, clipped, half_sq = policy_loss_terms(new_logp, old_logp, adv, clip)
    return masked_mean(loss, mask), masked_mean(clipped, mask), masked_mean(half_sq, mask)


def value_loss_terms(new_v: torch.Tensor, old_v: torch.Tensor, returns: torch.Tensor,
                     clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss -> ``(loss, clipped)``, both ``(B, R)``:
    loss_t = 0.5 * max((V_t - R_t)^2, (Vc_t - R_t)^2) with Vc = old_v + clip(V - old_v, -eps, eps);
    clipped_t = 1.0 where the clipped error was the larger. :func:`value_loss` is their masked mean."""
    clipped_v = old_v + torch.clamp(new_v - old_v, -clip, clip)
    loss_unclipped = (new_v - returns) ** 2
    loss_clipped = (clipped_v - returns) ** 2
    loss = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    with torch.no_grad():
        clipped_frac = (loss_clipped > loss_unclipped).to(loss.dtype)
    return loss, clipped_frac


def value_loss(new_v: torch.Tensor, old_v: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss -> ``(loss, clipfrac)``: 0.5 * mean(max((V - R)^2, (V_clipped - R)^2)) with
    V_clipped = old_v + clip(V - old_v, -eps, eps), so that one update cannot move the critic far from
    the values the advantages were computed with."""
    loss, clipped = value_loss_terms(new_v, old_v, returns, clip)
    return masked_mean(loss, mask), masked_mean(clipped, mask)


def apply_missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Add ``penalty`` (normally negative) to the score of every answer that did not end with EOS.

    Trick: truncated answers would otherwise be scored as if complete, and the policy learns to ramble
    up to the length limit. ``None`` turns the penalty off."""
    if penalty is None:
        return scores
    return torch.where(ended.to(torch.bool), scores, scores + penalty)


class FixedKLController:
    """A constant KL coefficient (the paper's beta = 0.5)."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019) proportional controller: steer the observed KL towards ``target``.

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon), where ``n_steps`` is the
    number of episodes in the batch that produced ``current_kl``.
    """

    def __init__(self, init: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController: target and horizon must be > 0")
        self.value = float(init)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return  # a non-finite KL says nothing about the right coefficient
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


def standardize_within_groups(scores: torch.Tensor, group_size: int, min_std: float = 1e-8) -> torch.Tensor:
    """Each consecutive group of ``group_size`` scores shifted and scaled to mean 0, std 1 (population
    std, over the group's own scores); a group whose std is below ``min_std`` becomes all zeros.

    The direct-ranking variant's reward (``str_direct``): ``scores`` are TextRank centralities, one
    group per prompt, and only an answer's standing among its own group's answers is a signal. A group
    of equally central answers (e.g. all identical) says nothing, hence zeros rather than noise blown up
    by a tiny std. Computed in float64, returned in ``scores``' dtype; shape ``(B,)`` with B a multiple
    of ``group_size``."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"expected a (B,) tensor with B a multiple of {group_size}, got shape {tuple(scores.shape)}")
    groups = scores.double().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    flat = std < min_std
    out = torch.where(flat, torch.zeros_like(groups), (groups - mean) / torch.where(flat, torch.ones_like(std), std))
    return out.view(-1).to(scores.dtype)
