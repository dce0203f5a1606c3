"""How TextRank's agreement with the gold-based order varies with the group size K and the embedder.

One pass of sampling: ``max(sizes)`` answers per study prompt from the SFT model. The first ``K``
answers of each prompt are a group of size ``K`` (independent draws, so a prefix is a random subset),
and every (embedder, K) cell ranks those groups with TextRank + ISODATA. Per cell:

* the agreement study of ``train.evaluation.agreement`` (tie-aware exact order match with its chance, Kendall
  tau; on all answers and on the ISODATA representatives);
* what ranking buys for STR: the METEOR (to the gold answer) of TextRank's top answer against the mean
  over the group (what a random pick gets) and the group's best (what an oracle gets).

Reward models are not in the sweep: they are trained once, on one K and one embedder.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from selfrank.train.evaluation.agreement import AgreementGroup, agreement_study
from selfrank.train.config import ExperimentConfig
from selfrank.train.evaluation.evaluate import TEXTRANK, example_references, sample_groups, study_prompts
from selfrank.train.evaluation.metrics import bootstrap_ci, meteor

log = logging.getLogger(__name__)


def pick_scores(ranked_scores: Sequence[Sequence[float]], ref_scores: Sequence[Sequence[float]],
                *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Reference score of the top-ranked answer vs a random pick (group mean) vs the group's best.

    ``top_is_best`` is how often the top answer has the group's best reference score; its chance is
    the mean fraction of answers that have it.
    """
    top, mean, best, hit, chance = [], [], [], [], []
    for scores, ref in zip(ranked_scores, ref_scores):
        scores, ref = np.asarray(scores, np.float64), np.asarray(ref, np.float64)
        winner = int(np.argmax(scores))  # argmax takes the lowest index on ties, as the ranker does
        top.append(ref[winner])
        mean.append(ref.mean())
        best.append(ref.max())
        is_best = np.isclose(ref, ref.max())
        hit.append(float(is_best[winner]))
        chance.append(float(is_best.mean()))
    out = {}
    for name, values in (("top_pick", top), ("random_pick", mean), ("best_pick", best), ("top_is_best", hit)):
        m, low, high = bootstrap_ci(np.asarray(values), n_resamples, confidence, seed)
        out[name] = {"mean": m, "low": low, "high": high}
    diff = np.asarray(top) - np.asarray(mean)
    m, low, high = bootstrap_ci(diff, n_resamples, confidence, seed)
    out["top_minus_random"] = {"mean": m, "low": low, "high": high}
    out["top_is_best_chance"] = float(np.mean(chance))
    return out


def agreement_sweep(config: ExperimentConfig, sft_folder: Path, examples: Sequence, task_kind: str, *,
                    sizes: Sequence[int], embedders: Sequence[str]) -> dict:
    """The sweep's cells (see module doc) as ``{"cells": [...], "n_groups": N, ...}``."""
    from selfrank.ranking.ranker import Ranker

    ev = config.eval
    picked = study_prompts(config, examples)
    if not picked:
        return {"cells": [], "n_groups": 0, "sizes": sorted(sizes), "embedders": list(embedders)}
    prompts = [examples[i].prompt for i in picked]
    references = [example_references(examples[i], task_kind, config.task.unanswerable_target) for i in picked]
    answers = sample_groups(config, sft_folder, prompts, max(sizes), desc="agreement sweep samples")
    ref_scores = [[meteor(a, refs) for a in group] for group, refs in zip(answers, references)]
    cells = []
    for embedder in embedders:
        ranking = dataclasses.replace(config.ranking,
                                      embedder=dataclasses.replace(config.ranking.embedder, name=embedder))
        ranker = Ranker(ranking)
        for k in sorted(sizes):
            raw = [{"id": examples[i].id, "prompt": p, "responses": group[:k]}
                   for i, p, group in zip(picked, prompts, answers)]
            ranked = ranker.rank(raw)
            groups = [AgreementGroup(id=r.id, ref_scores=ref[:k], scores={TEXTRANK: [float(s) for s in r.scores]},
                                     representatives=[int(x) for x in r.representatives])
                      for r, ref in zip(ranked, ref_scores)]
            study = agreement_study(groups, n_resamples=ev.bootstrap, confidence=ev.confidence, seed=ev.seed)
            picks = pick_scores([r.scores for r in ranked], [ref[:k] for ref in ref_scores],
                                n_resamples=ev.bootstrap, confidence=ev.confidence, seed=ev.seed)
            clusters = float(np.mean([len(r.representatives) for r in ranked]))
            cells.append({"embedder": embedder, "k": k, "mean_clusters": clusters,
                          "textrank": study["scorers"][TEXTRANK], **picks})
            log.info("agreement sweep %s K=%d: tau %s, top-pick METEOR %.3f vs random %.3f", embedder, k,
                     study["scorers"][TEXTRANK]["all"]["kendall_tau"], picks["top_pick"]["mean"],
                     picks["random_pick"]["mean"])
    return {"cells": cells, "n_groups": len(picked), "sizes": sorted(sizes), "embedders": list(embedders),
            "reference": "meteor", "source_row": "sft"}
