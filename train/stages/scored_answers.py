"""The sampled answers with each reward model's reward, for the tracker's sampled-answers table.

The sample stage's table shows how STR ranked each group (TextRank score, rank, cluster, pair role);
only once a reward model exists can the same answers carry their reward, so the reward stage logs the
table again, per variant, with that column filled (``reward/<variant>/answers``).
"""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from selfrank.train.config import ExperimentConfig

# Groups in the table: a sample a person can read, not the whole stage (W&B tables are kept in full).
TABLE_GROUPS = 50


def scored_groups(config: ExperimentConfig, rm_folder: Path, ranked_path: Path, limit: int = TABLE_GROUPS) -> list[dict]:
    """The first ``limit`` ranked groups of ``ranked_path`` with ``"rewards"``: the reward model's
    normalised reward of each answer (mean 0, std 1 over the SFT model's samples)."""
    from selfrank.train.models.reward_model import RewardModel, score

    with open(ranked_path, encoding="utf-8") as handle:
        groups = [json.loads(line) for line in islice(handle, limit) if line.strip()]
    if not groups:
        return []
    rm = RewardModel.from_pretrained(rm_folder, config.model)
    prompts = [g["prompt"] for g in groups for _ in g["responses"]]
    responses = [r for g in groups for r in g["responses"]]
    values = score(rm, rm.tokenizer, prompts, responses, batch_size=max(config.reward.batch_size, 32),
                   max_length=config.reward.max_length, normalized=True)
    offset = 0
    for group in groups:
        group["rewards"] = [float(v) for v in values[offset:offset + len(group["responses"])]]
        offset += len(group["responses"])
    return groups
