"""Exact-order agreement, tie handling, Kendall tau and the agreement study on hand-built groups."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from selfrank.train.evaluation.agreement import (AgreementGroup, agreement_study, chance_of_match, exact_order_match, has_ties,
                             kendall_tau)


def test_exact_order_match_hand_cases():
    ref = [0.9, 0.1, 0.5, 0.3]
    assert exact_order_match([4, 1, 3, 2], ref)  # same order, different scale
    assert exact_order_match([10.0, -5.0, 0.0, -1.0], ref)
    assert not exact_order_match([4, 1, 2, 3], ref)  # last two swapped
    assert not exact_order_match([1, 4, 3, 2], ref)
    assert not exact_order_match([4, 1, 3, 3], ref)  # a predicted tie where the reference is strict


def test_reference_ties_leave_the_pair_free():
    ref = [0.5, 0.5, 0.1]
    assert exact_order_match([2, 3, 1], ref)
    assert exact_order_match([3, 2, 1], ref)
    assert exact_order_match([3, 3, 1], ref)
    assert not exact_order_match([3, 1, 2], ref)
    assert has_ties(ref) and not has_ties([0.1, 0.2, 0.3])


def test_exact_order_match_shape_errors():
    with pytest.raises(ValueError):
        exact_order_match([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        exact_order_match([1], [1])


def test_chance_of_match_counts_tie_blocks():
    assert chance_of_match([0.4, 0.3, 0.2, 0.1]) == pytest.approx(1 / 24)
    assert chance_of_match([0.4, 0.4, 0.2, 0.1]) == pytest.approx(2 / 24)
    assert chance_of_match([0.0, 0.0, 0.0, 0.3]) == pytest.approx(6 / 24)
    assert chance_of_match([0.0, 0.0, 0.0, 0.0]) == pytest.approx(1.0)
    # Brute force over all 4! strict orders.
    ref = [0.2, 0.7, 0.2, 0.5]
    perms = list(itertools.permutations(range(4)))
    assert chance_of_match(ref) == pytest.approx(sum(exact_order_match(p, ref) for p in perms) / len(perms))


def test_random_order_matches_one_in_24_by_simulation():
    rng = np.random.default_rng(0)
    trials = 20000
    ref = np.array([0.31, 0.05, 0.77, 0.42])
    hits = sum(exact_order_match(rng.random(4), ref) for _ in range(trials))
    # 1/24 = 0.04167; the simulation's standard error is about 0.0014.
    assert hits / trials == pytest.approx(1 / 24, abs=0.006)


def test_kendall_tau_hand_cases():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    # One discordant pair of six: (5 - 1) / 6.
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert math.isnan(kendall_tau([1, 1, 1, 1], [1, 2, 3, 4]))
    assert math.isnan(kendall_tau([1, 2, 3, 4], [0, 0, 0, 0]))


def _group(i, ref, scores, reps=None):
    return AgreementGroup(id=str(i), ref_scores=list(ref), scores=scores, representatives=reps)


def test_agreement_study_all_and_isodata():
    groups = [
        # perfect scorer "good"; reversed scorer "bad"
        _group(0, [0.9, 0.6, 0.3, 0.1], {"good": [4, 3, 2, 1], "bad": [1, 2, 3, 4]}, reps=[0, 1, 2, 3]),
        _group(1, [0.1, 0.2, 0.3, 0.4], {"good": [1, 2, 3, 4], "bad": [4, 3, 2, 1]}, reps=[3, 0]),
        # reference ties: 0 and 1 tie; "good" orders them either way
        _group(2, [0.5, 0.5, 0.2, 0.0], {"good": [3, 4, 2, 1], "bad": [1, 2, 3, 4]}, reps=[0]),
    ]
    out = agreement_study(groups, n_resamples=200, confidence=0.9, seed=0)
    assert out["n_groups"] == 3 and out["group_sizes"] == {"4": 3}
    good, bad = out["scorers"]["good"], out["scorers"]["bad"]
    assert good["all"]["exact_match"] == 1.0 and bad["all"]["exact_match"] == 0.0
    assert good["all"]["n_groups_no_ref_ties"] == 2 and good["all"]["exact_match_no_ref_ties"] == 1.0
    assert good["all"]["chance"] == pytest.approx((1 / 24 + 1 / 24 + 2 / 24) / 3)
    assert good["all"]["kendall_tau"] > 0.9 and bad["all"]["kendall_tau"] < -0.9
    assert good["all"]["exact_match_low"] <= 1.0 <= good["all"]["exact_match_high"]
    # ISODATA: group 2 collapses to one representative -> skipped; group 1 keeps answers 3 and 0.
    iso = good["isodata"]
    assert iso["n_groups"] == 2 and iso["skipped"] == 1
    assert iso["mean_group_size"] == pytest.approx(3.0)
    assert iso["chance"] == pytest.approx((1 / 24 + 1 / 2) / 2)
    assert bad["isodata"]["exact_match"] == 0.0


def test_agreement_study_mixed_results_and_errors():
    rng = np.random.default_rng(1)
    groups = []
    for i in range(60):
        ref = rng.random(4)
        noisy = ref + rng.normal(0, 0.15, 4)  # a scorer that agrees often but not always
        groups.append(_group(i, ref, {"noisy": noisy.tolist(), "random": rng.random(4).tolist()}))
    out = agreement_study(groups, n_resamples=500, confidence=0.95, seed=0)
    noisy, rand = out["scorers"]["noisy"]["all"], out["scorers"]["random"]["all"]
    assert noisy["exact_match"] > rand["exact_match"]
    assert noisy["exact_match_low"] <= noisy["exact_match"] <= noisy["exact_match_high"]
    assert noisy["kendall_tau"] > 0.3 and abs(rand["kendall_tau"]) < 0.3
    assert out["scorers"]["noisy"]["isodata"]["n_groups"] == 0  # no representatives given
    with pytest.raises(ValueError, match="group 0"):
        agreement_study([_group(0, [1, 2, 3], {"x": [1, 2]})])


def test_pick_scores_hand_case():
    from selfrank.train.evaluation.agreement_sweep import pick_scores

    # Group 1: the ranker's top answer (index 1) is the best by the reference.
    # Group 2: the ranker's top answer (index 0) has reference 0.1; the best (0.5) is tied by two answers.
    ranked = [[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]
    ref = [[0.0, 0.9, 0.3], [0.1, 0.5, 0.5]]
    out = pick_scores(ranked, ref, n_resamples=50)
    assert out["top_pick"]["mean"] == pytest.approx((0.9 + 0.1) / 2)
    assert out["random_pick"]["mean"] == pytest.approx((0.4 + 1.1 / 3) / 2)
    assert out["best_pick"]["mean"] == pytest.approx((0.9 + 0.5) / 2)
    assert out["top_is_best"]["mean"] == pytest.approx(0.5)
    assert out["top_is_best_chance"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert out["top_minus_random"]["mean"] == pytest.approx(out["top_pick"]["mean"] - out["random_pick"]["mean"])
    for name in ("top_pick", "random_pick", "best_pick", "top_minus_random"):
        assert out[name]["low"] <= out[name]["mean"] <= out[name]["high"]
