"""Ranking agreement: the paper's human check, automated against the gold references.

The paper had annotators order 4 sampled answers per prompt and counted how often the reward model's
order matched theirs exactly (83.3% / 63.0%, against 1/4! = 4.17% at random). Here the reference
order is the METEOR of each answer to the gold references, and any scorer (a learned reward model,
the TextRank centrality) is compared with it.

Decisions, recorded:

* Ties. Sampled answers often tie in the reference (identical answers, or several with METEOR 0).
  ``exact_order_match`` is tie-aware: a pair tied in the reference puts no constraint on the
  prediction (any order of tied answers is accepted, as an annotator allowed to say "equal" would);
  every pair the reference orders strictly must be ordered the same way, strictly, by the prediction
  (a predicted tie there is a miss). The chance of a random order matching is then
  ``prod(t_k!) / n!`` over the reference's tie blocks ``t_k``, and the study reports the mean of that
  per-group chance next to the match rate. It also reports the strict figure on the groups whose
  reference has no ties, where the chance is exactly ``1 / n!``.
* ISODATA. "With ISODATA" keeps one representative per cluster (the medoid the ranker picked) and
  compares the orders of the representatives only, as the paper's annotators judged the filtered
  answers; groups that collapse to a single cluster carry no order and are left out (counted).
* Kendall tau: ``scipy.stats.kendalltau`` (tau-b, tie-corrected); undefined when either side is
  constant, and such groups are left out of the mean (counted).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from selfrank.train.evaluation.metrics import bootstrap_ci


@dataclass
class AgreementGroup:
    """One prompt's sampled answers with their reference scores and each scorer's scores."""
    id: str
    ref_scores: list[float]
    scores: dict[str, list[float]]  # scorer name -> one score per answer, higher is better
    representatives: list[int] | None = None  # ISODATA representatives (indices), None if not clustered
    meta: dict = field(default_factory=dict)


def _pair(pred_scores: Sequence[float], ref_scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred_scores, dtype=np.float64)
    ref = np.asarray(ref_scores, dtype=np.float64)
    if pred.ndim != 1 or pred.shape != ref.shape:
        raise ValueError(f"scores of different shapes: {pred.shape} vs {ref.shape}")
    if pred.size < 2:
        raise ValueError("an order needs at least 2 answers")
    return pred, ref


def exact_order_match(pred_scores: Sequence[float], ref_scores: Sequence[float], tol: float = 1e-12) -> bool:
    """True when the prediction orders every pair the reference orders strictly, the same way.

    Scores within ``tol`` of each other are ties. Pairs tied in the reference are free (see module doc).
    """
    pred, ref = _pair(pred_scores, ref_scores)
    ref_diff = ref[:, None] - ref[None, :]
    pred_diff = pred[:, None] - pred[None, :]
    constrained = ref_diff > tol  # i strictly above j in the reference
    return bool(np.all(pred_diff[constrained] > tol))


def has_ties(scores: Sequence[float], tol: float = 1e-12) -> bool:
    values = np.sort(np.asarray(scores, dtype=np.float64))
    return bool(np.any(np.diff(values) <= tol))


def chance_of_match(ref_scores: Sequence[float], tol: float = 1e-12) -> float:
    """Probability that a uniformly random strict order passes ``exact_order_match``: prod(t!)/n!."""
    values = np.sort(np.asarray(ref_scores, dtype=np.float64))
    blocks, run = [], 1
    for a, b in zip(values[:-1], values[1:]):
        if b - a <= tol:
            run += 1
        else:
            blocks.append(run)
            run = 1
    blocks.append(run)
    return math.prod(math.factorial(t) for t in blocks) / math.factorial(values.size)


def kendall_tau(pred_scores: Sequence[float], ref_scores: Sequence[float]) -> float:
    """Kendall tau-b between the two score lists; NaN when either is constant."""
    from scipy.stats import kendalltau

    pred, ref = _pair(pred_scores, ref_scores)
    if np.ptp(pred) == 0 or np.ptp(ref) == 0:
        return float("nan")
    return float(kendalltau(pred, ref).statistic)


def _summary(matches: list[bool], chances: list[float], strict: list[bool], taus: list[float], sizes: list[int],
             n_resamples: int, confidence: float, seed: int) -> dict:
    out: dict = {"n_groups": len(matches), "mean_group_size": float(np.mean(sizes)) if sizes else None}
    if matches:
        mean, low, high = bootstrap_ci(np.asarray(matches, float), n_resamples, confidence, seed)
        out.update(exact_match=mean, exact_match_low=low, exact_match_high=high, chance=float(np.mean(chances)))
    else:
        out.update(exact_match=None, exact_match_low=None, exact_match_high=None, chance=None)
    out["n_groups_no_ref_ties"] = len(strict)
    out["exact_match_no_ref_ties"] = float(np.mean(strict)) if strict else None
    valid = [t for t in taus if not math.isnan(t)]
    out["n_tau"] = len(valid)
    if valid:
        mean, low, high = bootstrap_ci(np.asarray(valid), n_resamples, confidence, seed)
        out.update(kendall_tau=mean, kendall_tau_low=low, kendall_tau_high=high)
    else:
        out.update(kendall_tau=None, kendall_tau_low=None, kendall_tau_high=None)
    return out


def agreement_study(groups: Sequence[AgreementGroup], *, n_resamples: int = 1000, confidence: float = 0.95,
                    seed: int = 0, tol: float = 1e-12) -> dict:
    """For every scorer: exact-order match rate (with CI and chance), Kendall tau (with CI),
    on all answers (``"all"``) and on ISODATA representatives (``"isodata"``).

    ``n_groups_no_ref_ties`` / ``exact_match_no_ref_ties`` give the strict figure on groups without
    reference ties; its chance is ``1 / n!`` for groups of ``n``. ``skipped`` counts groups that
    carry no order (one answer or one cluster).
    """
    names = sorted({name for g in groups for name in g.scores})
    result: dict = {"n_groups": len(groups), "scorers": {}}
    sizes = Counter(len(g.ref_scores) for g in groups)
    result["group_sizes"] = {str(k): v for k, v in sorted(sizes.items())}
    for name in names:
        per_filter = {}
        for filt in ("all", "isodata"):
            matches, chances, strict, taus, n_sizes, skipped = [], [], [], [], [], 0
            for g in groups:
                if name not in g.scores:
                    continue
                pred = np.asarray(g.scores[name], dtype=np.float64)
                ref = np.asarray(g.ref_scores, dtype=np.float64)
                if pred.shape != ref.shape:
                    raise ValueError(f"group {g.id}: {name} has {pred.size} scores for {ref.size} answers")
                if filt == "isodata":
                    if g.representatives is None:
                        continue
                    keep = sorted(set(g.representatives))
                    pred, ref = pred[keep], ref[keep]
                if pred.size < 2:
                    skipped += 1
                    continue
                match = exact_order_match(pred, ref, tol)
                matches.append(match)
                chances.append(chance_of_match(ref, tol))
                if not has_ties(ref, tol):
                    strict.append(match)
                taus.append(kendall_tau(pred, ref))
                n_sizes.append(pred.size)
            summary = _summary(matches, chances, strict, taus, n_sizes, n_resamples, confidence, seed)
            summary["skipped"] = skipped
            per_filter[filt] = summary
        result["scorers"][name] = per_filter
    return result
