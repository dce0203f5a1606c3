"""PPO maths against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from selfrank.train.rl.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    compute_rewards,
    entropy_from_logits,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_kl,
    policy_loss,
    value_loss,
)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=0)


def test_logprobs_use_the_sampling_temperature():
    # Two-token vocabulary, logits (0, ln 3): p = (1/4, 3/4); at T = 0.5 the logits double: p = (1/10, 9/10).
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    ids = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, ids, 1.0), [[math.log(0.75), math.log(0.25)]])
    close(logprobs_from_logits(logits, ids, 0.5), [[math.log(0.9), math.log(0.1)]])
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, ids, 0.0)


def test_entropy():
    close(entropy_from_logits(torch.zeros(4)), math.log(4))
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy_from_logits(torch.tensor([0.0, math.log(3.0)])), expected)


def test_masked_statistics_and_whitening():
    x = torch.tensor([2.0, 4.0, 6.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    close(masked_mean(x, mask), 4.0)
    close(masked_var(x, mask), 4.0)  # (4 + 0 + 4) / (3 - 1)
    close(masked_var(x, mask, unbiased=False), 8.0 / 3.0)
    close(masked_whiten(x, mask)[:3], [-1.0, 0.0, 1.0], tol=1e-5)
    close(masked_whiten(x, mask, shift_mean=False)[:3], [3.0, 4.0, 5.0], tol=1e-5)
    rows = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    close(masked_mean(rows, torch.tensor([[1, 1], [1, 0]]), dim=1), [2.0, 5.0])
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([1, 0, 0, 0]))


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -3.0])
    close(per_token_kl(logp, ref, "k1"), [1.0, 0.0])
    # k3 = (r - 1) - log r with r = pi_ref / pi = e^-1: e^-1 - 1 + 1.
    close(per_token_kl(logp, ref, "k3"), [math.exp(-1.0), 0.0])
    with pytest.raises(ValueError):
        per_token_kl(logp, ref, "k2")


def test_compute_rewards_puts_score_on_last_real_token():
    score = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # Row 0: KL (0.5, 0, -1) -> -0.5 * KL = (-0.25, 0, 0.5), + 2 at index 2.
    # Row 1: KL (1, -1, masked) -> (-0.5, 0.5, 0), + (-1) at index 1.
    close(compute_rewards(score, logp, ref, mask, kl_coef=0.5), [[-0.25, 0.0, 2.5], [-0.5, -0.5, 0.0]])


def test_gae_three_tokens_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    mask = torch.ones(1, 3)
    # delta2 = 1 - 0.3 = 0.7 -> A2 = 0.7; delta1 = -0.2 + 0.3 - 0.4 = -0.3 -> A1 = -0.3 + 0.5 * 0.7 = 0.05;
    # delta0 = 0.1 + 0.4 - 0.5 = 0 -> A0 = 0.5 * 0.05 = 0.025. Returns = A + V.
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.025, 0.05, 0.7]])
    close(ret, [[0.525, 0.45, 1.0]])


def test_gae_ignores_padding_after_the_last_token():
    rewards = torch.tensor([[0.2, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.3, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    # The episode ends at index 1, so V after it is 0: delta1 = 1 - 0.3 = 0.7; A1 = 0.7;
    # delta0 = 0.2 + 0.9 * 0.3 - 0.5 = -0.03; A0 = -0.03 + 0.9 * 1.0 * 0.7 = 0.6.
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    close(adv, [[0.6, 0.7, 0.0]])
    close(ret, [[1.1, 1.0, 0.0]])


def test_policy_loss_clipping_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.2]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    old = torch.zeros(1, 4)
    new = torch.log(ratio).requires_grad_(True)
    mask = torch.ones(1, 4)
    loss, clipfrac, approx_kl = policy_loss(new, old, adv, mask, clip=0.2)
    # t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(0.5, 0.8) = 0.8 (clipped);
    # t2: -2.2 either way (inside the range); t3: ratio exactly at the clip, -1.2 both ways (not clipped).
    close(loss, (-1.2 + 0.8 - 2.2 - 1.2) / 4)
    close(clipfrac, 0.5)
    close(approx_kl, 0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.1, 1.2)) / 4)
    loss.backward()
    # Clipped tokens pass no gradient; d/dlogp of -A * ratio is -A * ratio / 4 for the others.
    close(new.grad, [[0.0, 0.0, -2.0 * 1.1 / 4, -1.0 * 1.2 / 4]], tol=1e-5)


def test_policy_loss_respects_mask():
    new = torch.tensor([[0.0, 5.0]])
    loss, clipfrac, approx_kl = policy_loss(new, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1, 0]]), 0.2)
    close(loss, -1.0)
    close(clipfrac, 0.0)
    close(approx_kl, 0.0)


def test_value_loss_clipping_by_hand():
    old = torch.tensor([[0.0, 0.0, 1.0]])
    new = torch.tensor([[0.5, 0.1, 1.1]], requires_grad=True)
    returns = torch.tensor([[1.0, -1.0, 3.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac = value_loss(new, old, returns, mask, clip=0.2)
    # t0: (0.5 - 1)^2 = 0.25 vs clipped V = 0.2: 0.64 -> 0.64 (clipped);
    # t1, t2: inside the range, 1.21 and 3.61 both ways.
    close(loss, 0.5 * (0.64 + 1.21 + 3.61) / 3, tol=1e-5)
    close(clipfrac, 1.0 / 3.0)
    loss.backward()
    # The clipped token passes no gradient; the others d/dV 0.5 * (V - R)^2 / 3 = (V - R) / 3.
    close(new.grad, [[0.0, (0.1 + 1.0) / 3, (1.1 - 3.0) / 3]], tol=1e-5)
    # A value moved by exactly the clip: both terms agree, so it is not counted as clipped.
    at_clip, frac = value_loss(torch.tensor([0.25]), torch.tensor([0.0]), torch.tensor([1.0]), torch.ones(1), 0.25)
    close(at_clip, 0.5 * 0.75 ** 2)
    close(frac, 0.0)


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0, -0.5])
    ended = torch.tensor([True, False, False])
    close(apply_missing_eos_penalty(scores, ended, -1.0), [1.0, 1.0, -1.5])
    close(apply_missing_eos_penalty(scores, ended, None), scores)


def test_adaptive_kl_controller_update_and_state():
    ctl = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    ctl.update(9.0, 16)  # error 0.5 clipped to 0.2
    close(ctl.value, 0.5 * (1 + 0.2 * 16 / 10000), tol=1e-9)
    ctl2 = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    ctl2.update(6.6, 16)  # error 0.1 (inside the clip)
    close(ctl2.value, 0.5 * (1 + 0.1 * 16 / 10000), tol=1e-9)
    ctl2.update(0.0, 100)  # error -1 clipped to -0.2
    close(ctl2.value, 0.5 * (1 + 0.1 * 16 / 10000) * (1 - 0.2 * 100 / 10000), tol=1e-9)
    ctl2.update(float("nan"), 16)  # ignored
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(ctl2.state_dict())
    assert restored.state_dict() == ctl2.state_dict()

    fixed = FixedKLController(0.5)
    fixed.update(100.0, 16)
    assert fixed.value == 0.5
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.5
