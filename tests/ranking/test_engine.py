"""rank_group end to end on hand-made embeddings, its invariants, and the JSON round trip."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from selfrank.ranking.config import IsodataConfig, NoiseConfig, PairConfig, RankingConfig
from selfrank.ranking.engine import JSON_KEYS, RankedGroup, prepare_responses, rank_group
from selfrank.ranking.isodata import medoid_indices


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# Three answers about A (one cluster), two about B, one off-topic answer C.
EMB = unit([
    [1.0, 0.02, 0.0, 0.0],
    [1.0, -0.03, 0.01, 0.0],
    [1.0, 0.0, -0.02, 0.0],
    [0.3, 1.0, 0.0, 0.02],
    [0.3, 1.0, 0.03, 0.0],
    [0.0, 0.0, 0.2, 1.0],
])
TEXTS = ["A is true.", "A holds.", "Indeed A.", "B is true.", "B holds.", "Something else."]


def word_distance(a: str, b: str) -> int:
    """Size of the multiset difference of two texts' words (lower-cased, punctuation kept)."""
    ca, cb = Counter(a.lower().split()), Counter(b.lower().split())
    return sum(((ca - cb) + (cb - ca)).values())


def test_end_to_end_on_hand_made_embeddings():
    g = rank_group("q1", "Is A true?", TEXTS, EMB, RankingConfig())
    assert sum(g.scores) == pytest.approx(1.0)
    assert set(g.order[:3]) == {0, 1, 2} and g.order[-1] == 5  # the dense cluster first, the outlier last
    assert g.clusters[0] == g.clusters[1] == g.clusters[2] != g.clusters[3] == g.clusters[4] != g.clusters[5]
    assert len(set(g.clusters)) == 3
    reps = g.representatives
    assert len(reps) == 3 and [g.clusters[r] for r in reps] == [g.clusters[0], g.clusters[3], g.clusters[5]]
    assert sorted(reps) == sorted(medoid_indices(EMB, g.clusters, preference=[g.order.index(i) for i in range(6)]))
    # IL = floor(3 / 2) = 1: every representative beats every lower-ranked one.
    assert g.pairs == [(reps[0], reps[1]), (reps[0], reps[2]), (reps[1], reps[2])]
    assert g.noise == [None, None, None]
    # With IL = 2 only best-vs-worst remains.
    g2 = rank_group("q1", "Is A true?", TEXTS, EMB, RankingConfig(pairs=PairConfig(interval=2)))
    assert g2.pairs == [(reps[0], reps[2])]


def test_json_round_trip():
    cfg = RankingConfig(noise=NoiseConfig(enabled=True, probability=1.0))
    g = rank_group("q1", "Is A true?", TEXTS, EMB, cfg, seed=3)
    obj = json.loads(json.dumps(g.to_json()))
    assert list(obj) == list(JSON_KEYS)
    assert all(isinstance(p, list) and len(p) == 2 for p in obj["pairs"])
    assert RankedGroup.from_json(obj) == g
    assert all(rec["text"] == text for rec, (_, text) in zip(obj["noise"], g.noised_pairs()))
    with pytest.raises(ValueError, match="missing keys"):
        RankedGroup.from_json({"id": "x"})
    for key, bad in (("pairs", [[0, 99]]), ("scores", [0.5]), ("noise", []), ("responses", "text")):
        with pytest.raises(ValueError):
            RankedGroup.from_json({**obj, key: bad})


def test_isodata_disabled_keeps_every_answer():
    cfg = RankingConfig(isodata=IsodataConfig(enabled=False))
    g = rank_group("q", "p", TEXTS, EMB, cfg)
    assert g.clusters == list(range(6))
    assert g.representatives == g.order
    il = 3
    pos = {r: i for i, r in enumerate(g.order)}
    assert g.pairs and all(pos[l] - pos[w] >= il for w, l in g.pairs)
    assert len(g.pairs) == 6  # (0,3),(0,4),(0,5),(1,4),(1,5),(2,5) in rank positions


def test_identical_texts_are_never_paired():
    texts = ["Same.", "Same.", "Other.", "Third."]
    emb = unit([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    for enabled in (True, False):
        cfg = RankingConfig(isodata=IsodataConfig(enabled=enabled), pairs=PairConfig(all_cross_cluster=True))
        g = rank_group("q", "p", texts, emb, cfg)
        assert all(texts[w] != texts[l] for w, l in g.pairs)
        if enabled:
            assert g.clusters[0] == g.clusters[1]


def test_invariants_over_random_groups():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 10))
        base = rng.normal(size=(max(1, n // 2 + 1), 8))
        idx = rng.integers(0, base.shape[0], size=n)  # duplicates on purpose
        emb = unit(base[idx] + 0.0)
        texts = [f"answer {i}. It is fine." for i in idx]
        cfg = RankingConfig(
            isodata=IsodataConfig(initial_k=int(rng.integers(1, 6))),
            pairs=PairConfig(interval=None if rng.random() < 0.5 else int(rng.integers(1, 4)),
                             all_cross_cluster=bool(rng.random() < 0.3)),
            noise=NoiseConfig(enabled=True, probability=0.5),
        )
        g = rank_group(f"g{trial}", "p", texts, emb, cfg, seed=trial)
        assert sum(g.scores) == pytest.approx(1.0) and all(np.isfinite(g.scores))
        assert sorted(g.order) == list(range(n))
        assert len(g.representatives) == len(set(g.clusters)) == max(g.clusters) + 1
        pos = {r: i for i, r in enumerate(g.order)}
        assert [pos[r] for r in g.representatives] == sorted(pos[r] for r in g.representatives)
        for i in range(n):
            for j in range(n):
                if idx[i] == idx[j]:
                    assert g.clusters[i] == g.clusters[j]
        reps = set(g.representatives)
        for w, l in g.pairs:
            assert w in reps and l in reps and g.clusters[w] != g.clusters[l]
            assert pos[w] < pos[l]
        assert len(g.noise) == len(g.pairs)
        assert g.responses == texts  # noise never rewrites the responses themselves
        for (w, l), rec in zip(g.pairs, g.noise):
            if rec is not None:
                assert rec["text"] != texts[l] and rec["text"] != texts[w]


def test_noise_applies_to_losers_and_is_seeded():
    cfg = RankingConfig(noise=NoiseConfig(enabled=True, probability=1.0), pairs=PairConfig(all_cross_cluster=True))
    g = rank_group("q", "p", TEXTS, EMB, cfg, seed=1)
    assert all(rec is not None for rec in g.noise)
    for (w, l), rec, (wt, lt) in zip(g.pairs, g.noise, g.noised_pairs()):
        assert wt == TEXTS[w] and lt == rec["text"] != TEXTS[l]
        # The perturbed text is an edit of the loser (at most 3 words in or out), not of the winner.
        assert word_distance(lt, TEXTS[l]) <= 3 < word_distance(lt, TEXTS[w])
    again = rank_group("q", "p", TEXTS, EMB, cfg, seed=1)
    assert again.noise == g.noise
    others = [rank_group(gid, "p", TEXTS, EMB, cfg, seed=s).noise for gid, s in (("r", 1), ("q", 2), ("s", 3))]
    assert any(o != g.noise for o in others)
    off = rank_group("q", "p", TEXTS, EMB, RankingConfig(noise=NoiseConfig(enabled=True, probability=0.0)))
    assert all(rec is None for rec in off.noise)


def test_noise_does_not_depend_on_the_process_hash_seed(repo_root):
    code = (
        "import json, numpy as np\n"
        "from selfrank.ranking.config import RankingConfig, NoiseConfig, PairConfig\n"
        "from selfrank.ranking.engine import rank_group\n"
        f"emb = np.array({EMB.tolist()!r}, dtype=np.float32)\n"
        f"g = rank_group('grp-7', 'p', {TEXTS!r}, emb, RankingConfig(noise=NoiseConfig(enabled=True, "
        "probability=0.6), pairs=PairConfig(all_cross_cluster=True)), seed=5)\n"
        "print(json.dumps(g.noise))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True, check=True
    )
    cfg = RankingConfig(noise=NoiseConfig(enabled=True, probability=0.6), pairs=PairConfig(all_cross_cluster=True))
    here = rank_group("grp-7", "p", TEXTS, EMB, cfg, seed=5)
    assert json.loads(out.stdout) == here.noise
    assert any(rec is not None for rec in here.noise)


def test_degenerate_groups():
    cfg = RankingConfig(noise=NoiseConfig(enabled=True, probability=1.0))
    one = rank_group("q", "p", ["Only."], unit([[1.0, 0.0]]), cfg)
    assert one.scores == [1.0] and one.order == [0] and one.representatives == [0] and one.pairs == []
    empty = rank_group("q", "p", [], np.zeros((0, 4), dtype=np.float32), cfg)
    assert empty.to_json()["pairs"] == [] and empty.scores == []
    same = rank_group("q", "p", ["x."] * 4, np.tile(unit([[0.0, 1.0]]), (4, 1)), cfg)
    assert same.scores == pytest.approx([0.25] * 4) and same.clusters == [0] * 4 and same.pairs == []
    blanks = rank_group("q", "p", ["", "", "fine."], np.vstack([np.zeros((2, 2)), unit([[1.0, 0.0]])]), cfg)
    assert all(np.isfinite(blanks.scores)) and blanks.clusters[0] == blanks.clusters[1]
    with pytest.raises(ValueError):
        rank_group("q", "p", ["a", "b"], unit([[1.0, 0.0]]), cfg)
    with pytest.raises(ValueError):
        rank_group("q", "p", ["a"], np.array([[np.nan, 1.0]]), cfg)


def test_prepare_responses_applies_the_configured_clean_up():
    texts = ["Done. Half a sen", "Complete."]
    assert prepare_responses(texts, RankingConfig()) == texts
    assert prepare_responses(texts, RankingConfig(drop_incomplete_sentence=True)) == ["Done.", "Complete."]
