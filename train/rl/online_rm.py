"""The online reward-model variant (``str_online``): the RM keeps learning from PPO's own ranked rollouts.

Every PPO step hands its rollout groups to the ranking pool; the refresher collects the ranked groups
(dropping those from a policy more than ``ppo.online_rm_max_staleness`` steps old) and every
``ppo.online_rm_every`` steps takes a few pairwise-loss steps on their (winner, loser) pairs.
"""
from __future__ import annotations

import numpy as np
import torch

from selfrank.train import dist
from selfrank.train.config import ExperimentConfig
from selfrank.train.models.reward_model import RewardModel, encode_pairs, pairwise_rewards
from selfrank.train.optim import adamw
from selfrank.train.rl.reward_losses import pairwise_loss


class OnlineRewardRefresher:
    """Collects ranked rollout groups from the pool and refreshes the RM on their pairs.

    Results ranked from a policy more than ``max_staleness`` steps old are dropped: their pairs
    describe answers the current policy no longer gives."""

    def __init__(self, rm: RewardModel, tokenizer, config: ExperimentConfig, steps_per_refresh: int = 4):
        self.rm = rm
        self.tokenizer = tokenizer
        self.max_staleness = config.ppo.online_rm_max_staleness
        self.max_length = config.reward.max_length
        self.batch_size = config.reward.batch_size
        self.steps_per_refresh = steps_per_refresh
        rm.requires_grad_(True)
        self.optimizer = adamw(rm, config.reward.lr, weight_decay=0.0)
        rm.requires_grad_(False)
        self.fresh: list[tuple[int, str, str, str]] = []  # (policy_version, prompt, winner, loser)
        self.dropped_stale = 0
        self.failed = 0

    def take(self, results) -> None:
        for result in results:
            if getattr(result, "error", None) is not None:
                self.failed += 1
                continue
            ranked = result.ranked
            version = int(getattr(result, "policy_version", 0) or 0)
            for winner, loser in ranked.pairs:
                self.fresh.append((version, ranked.prompt, ranked.responses[winner], ranked.responses[loser]))

    def refresh(self, step: int, generator: torch.Generator, accelerator=None) -> dict:
        """A few pairwise-loss steps on the fresh pairs; returns statistics for the log.

        Under a launcher (``accelerator`` with several processes) every process ranked its own rollout
        groups: the fresh pairs of all processes are gathered, the main process trains, and the new
        weights are broadcast so that every process scores with the same RM. Collective then."""

        keep = [p for p in self.fresh if step - p[0] <= self.max_staleness]
        self.dropped_stale += len(self.fresh) - len(keep)
        self.fresh = []
        several = accelerator is not None and accelerator.num_processes > 1
        if several:
            keep = dist.gather_lists(keep)
            dropped = int(dist.reduce_sum(float(self.dropped_stale), accelerator))
        else:
            dropped = self.dropped_stale
        stats = {"online_rm/pairs": len(keep), "online_rm/dropped_stale": dropped}
        if not keep:
            return stats
        if several and not accelerator.is_main_process:
            self._receive_weights()
            return stats
        prompts = [p[1] for p in keep]
        winners = encode_pairs(self.tokenizer, prompts, [p[2] for p in keep], self.max_length)
        losers = encode_pairs(self.tokenizer, prompts, [p[3] for p in keep], self.max_length)
        items = [[w, l] for w, l in zip(winners, losers)]
        self.rm.train()
        self.rm.requires_grad_(True)
        losses = []
        try:
            for _ in range(self.steps_per_refresh):
                order = torch.randperm(len(items), generator=generator)[:self.batch_size].tolist()
                r_w, r_l = pairwise_rewards(self.rm, self.tokenizer, [items[i] for i in order])
                loss = pairwise_loss(r_w, r_l)
                if not bool(torch.isfinite(loss)):
                    break
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(float(loss.detach()))
        finally:
            self.rm.eval()
            self.rm.requires_grad_(False)
        if losses:
            stats["online_rm/loss"] = float(np.mean(losses))
        if several:
            self._receive_weights()  # the main process sends
        return stats

    def _receive_weights(self) -> None:
        """Every process takes the main process's RM weights (collective)."""
        with torch.no_grad():
            for tensor in [*self.rm.parameters(), *self.rm.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)
