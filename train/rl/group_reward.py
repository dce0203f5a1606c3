"""The direct-ranking variant's reward (``str_direct``): no reward model, each rollout group ranks itself.

Every PPO step samples ``ppo.samples_per_prompt`` answers per prompt; each prompt's answers are ranked
against each other exactly as the sample stage ranks its groups (``selfrank.ranking``'s ``Ranker``:
TextRank centrality over Sentence-BERT similarities), and an answer's reward is its centrality
standardised within its group (``ppo_math.standardize_within_groups``): a group-relative signal that
needs no reward model and is online by construction (it always judges the current policy's answers).

Where the ranking runs: on the main process, over the whole (gathered) global batch in one ``Ranker``
call, and the rewards are broadcast. So the rewards are a function of the batch's answers only: the
same on any number of processes, and the same again when a resumed run redoes a step (the embedder
sees the same texts in the same call). The ranking is on the step's critical path (the rewards are
needed before the update); embedding one batch of short answers is small next to a PPO step.
"""
from __future__ import annotations

import torch

from selfrank.ranking.config import RankingConfig
from selfrank.train.rl.ppo_math import standardize_within_groups


class GroupRankingReward:
    """Rewards for a rollout batch from ranking each prompt's group of answers (see the module doc).

    The ``Ranker`` (and its sentence encoder) is built on first use and only on the main process."""

    def __init__(self, config: RankingConfig, seed: int = 0):
        self.config = config
        self.seed = seed
        self._ranker = None

    def centrality(self, prompts: list[str], texts: list[str], group_size: int) -> list[float]:
        """TextRank centrality of every answer within its prompt's group (``texts``: ``group_size``
        answers per prompt, prompt-major). One ``Ranker`` call: one encode over the distinct texts."""
        from selfrank.ranking.ranker import Ranker

        if len(texts) != len(prompts) * group_size:
            raise ValueError(f"expected {len(prompts)} x {group_size} answers, got {len(texts)}")
        if self._ranker is None:
            self._ranker = Ranker(self.config, seed=self.seed)
        groups = [{"id": str(i), "prompt": prompt, "responses": texts[i * group_size:(i + 1) * group_size]}
                  for i, prompt in enumerate(prompts)]
        return [score for ranked in self._ranker.rank(groups) for score in ranked.scores]

    def __call__(self, prompts: list[str], texts: list[str], group_size: int,
                 accelerator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centrality, reward)``, each ``(B,)`` float32 on the accelerator's device, for the global
        batch (``texts`` as gathered: every process holds them all). Collective under a launcher: the
        main process ranks and broadcasts."""
        device = accelerator.device
        if accelerator.is_main_process:
            raw = torch.tensor(self.centrality(prompts, texts, group_size), dtype=torch.float64, device=device)
        else:
            raw = torch.zeros(len(texts), dtype=torch.float64, device=device)
        if accelerator.num_processes > 1:
            torch.distributed.broadcast(raw, src=0)
        reward = standardize_within_groups(raw, group_size)
        return raw.float(), reward.float()
