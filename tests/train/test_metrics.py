"""Metrics against published values (NLTK doctests, sacreBLEU README) and the official SQuAD v2 script."""
from __future__ import annotations

import collections
import os
import re
import string
import subprocess
import sys

import numpy as np
import pytest

from selfrank.train.evaluation import metrics

REF1 = "It is a guide to action that ensures that the military will forever heed Party commands"
REF2 = ("It is the guiding principle which guarantees the military forces always being under the command of "
        "the Party")
REF3 = "It is the practical guide for the army always to heed the directions of the party"
HYP1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
HYP2 = "It is to insure the troops forever hearing the activity guidebook that party direct"


# ----------------------------------------------------------------------------- BLEU / GLEU / METEOR


def doctest_value(shown: float):
    """A doctest's ``0.5045...``: the value lies in [shown, shown + 1e-4)."""
    return pytest.approx(shown + 0.5e-4, abs=0.5e-4)


def test_bleu4_matches_nltk_doctest_values():
    # nltk/translate/bleu_score.py doctests: 0.5045... (no smoothing needed: every n-gram order matches)
    # and 0.0370... for hypothesis2 with SmoothingFunction().method1. Case kept so tokens equal str.split().
    assert metrics.bleu4(HYP1, [REF1, REF2, REF3], lowercase=False) == doctest_value(0.5045)
    assert metrics.bleu4(HYP2, [REF1, REF2, REF3], lowercase=False) == doctest_value(0.0370)


def test_bleu4_lowercases_by_default_and_scores_empty_as_zero():
    assert metrics.bleu4("THE CAT SAT ON THE MAT", ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert metrics.bleu4("THE CAT SAT ON THE MAT", ["the cat sat on the mat"], lowercase=False) < 0.1
    assert metrics.bleu4("", ["the cat"]) == 0.0


def test_gleu_matches_nltk_doctest_values():
    # nltk/translate/gleu_score.py doctests.
    assert metrics.gleu(HYP1, [REF1], lowercase=False) == doctest_value(0.4393)
    assert metrics.gleu(HYP2, [REF1], lowercase=False) == doctest_value(0.1206)
    assert metrics.gleu("the the the the the the the", ["the cat is on the mat"]) == doctest_value(0.0909)


def test_meteor_matches_nltk_doctest_values_with_multiple_references():
    # nltk/translate/meteor_score.py doctests: 0.6944 for one reference and for three (best of them).
    assert metrics.meteor(HYP1, [REF1]) == doctest_value(0.6944)
    assert metrics.meteor(HYP1, [REF1, REF2, REF3]) == doctest_value(0.6944)
    assert metrics.meteor("non matching hypothesis", ["this is a cat"]) == 0.0


def test_meteor_uses_wordnet_synonyms():
    # "hound" and "dog" share a WordNet synset; without WordNet this pair would score 0.
    assert metrics.meteor("hound", ["dog"]) > 0.4
    assert metrics.meteor("table", ["dog"]) == 0.0


def test_meteor_fails_loudly_without_wordnet(tmp_path):
    # No folder NLTK searches holds WordNet (not even the environment's own share/nltk_data).
    code = ("import sys, nltk\n"
            "nltk.data.path[:] = [sys.argv[1]]\n"
            "from selfrank.train.evaluation.metrics import meteor\n"
            "print(meteor('a dog barked', ['the hound barked']))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode != 0
    assert "UserError" in done.stderr and "METEOR needs WordNet" in done.stderr
    assert "python -m selfrank.launch.setup_wordnet" in done.stderr and "NLTK_DATA" in done.stderr
    assert done.stdout.strip() == ""  # no score at all, not a silent 0


def test_meteor_finds_wordnet_inside_the_environment_with_no_variable_set(tmp_path):
    """The set-up builds WordNet in <sys.prefix>/share/nltk_data, which NLTK always searches: a command
    run from any directory, with no NLTK_DATA, scores METEOR with synonyms."""
    code = ("from selfrank.train.evaluation.metrics import meteor, wordnet_home\n"
            "import nltk, sys\n"
            "print(meteor('a dog barked', ['the hound barked']), wordnet_home() in nltk.data.path)\n")
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    score, searched = done.stdout.split()
    assert searched == "True" and float(score) > metrics.meteor("a dog barked", ["the cat barked"])


def test_corpus_bleu_matches_sacrebleu_readme_example():
    # sacreBLEU README: BLEU = 48.53 for these three sentences and two reference streams.
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "The dog had bit the man."],
            ["It was not unexpected.", "No one was surprised."],
            ["The man bit him first.", "The man had bitten the dog."]]
    assert metrics.corpus_bleu(hyps, refs) == pytest.approx(48.53, abs=0.005)


def test_corpus_bleu_accepts_variable_reference_counts():
    hyps = ["the cat sat on the mat", "a dog ran in the park today"]
    refs = [["the cat sat on the mat"], ["a dog ran in the park today", "the dog ran"]]
    assert metrics.corpus_bleu(hyps, refs) == pytest.approx(100.0)


def test_references_must_be_a_list():
    with pytest.raises(ValueError, match="references"):
        metrics.bleu4("a b", "a b")
    with pytest.raises(ValueError, match="references"):
        metrics.gleu("a b", [])


def test_tokenize_splits_words_and_punctuation():
    assert metrics.tokenize("Hello, World!") == ["hello", ",", "world", "!"]
    assert metrics.tokenize("Hello, World!", lowercase=False) == ["Hello", ",", "World", "!"]


# ----------------------------------------------------------------------------- SQuAD v2.0
# The official SQuAD v2.0 evaluation script's functions, verbatim in substance, as the oracle.


def _official_normalize(s):
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_tokens(s):
    return _official_normalize(s).split() if s else []


def _official_exact(a_gold, a_pred):
    return int(_official_normalize(a_gold) == _official_normalize(a_pred))


def _official_f1(a_gold, a_pred):
    gold_toks, pred_toks = _official_tokens(a_gold), _official_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def _official_scores(pred, answers):
    gold = [a for a in answers if _official_normalize(a)] or [""]
    return max(_official_exact(a, pred) for a in gold), max(_official_f1(a, pred) for a in gold)


SQUAD_CASES = [
    ("The Eiffel Tower!", ["Eiffel Tower"]),
    ("an apple", ["apple", "the apple tree"]),
    ("theatre", ["the atre"]),  # "the" inside a word is not an article
    ("the cat sat on the mat", ["a cat on a mat"]),
    ("cat", ["dog", "cat sat"]),
    ("Denver Broncos", ["Denver Broncos", "The Denver Broncos", "Broncos"]),
    ("in 1066,", ["1066", "in 1066"]),
    ("", []),
    ("Paris", []),
    ("", ["Paris"]),
    ("...", ["the"]),  # both normalise to nothing: no-answer on both sides
    ("Normandy region France", ["France", "Normandy"]),
    ("ün café", ["Ün Café!"]),
]


@pytest.mark.parametrize("pred, answers", SQUAD_CASES)
def test_squad_em_f1_equal_official_script(pred, answers):
    em, f1 = _official_scores(pred, answers)
    ours = metrics.squad_scores(pred, answers, unanswerable=None)
    assert ours["em"] == em
    assert ours["f1"] == pytest.approx(f1)
    assert metrics.normalize_answer(pred) == _official_normalize(pred)


def test_squad_hand_values_precision_recall():
    s = metrics.squad_scores("the cat sat on the mat", ["a cat on a mat"])
    assert (s["em"], s["precision"], s["recall"]) == (0.0, 0.75, 1.0)
    assert s["f1"] == pytest.approx(6 / 7)
    s = metrics.squad_scores("cat", ["dog", "cat sat"])
    assert (s["precision"], s["recall"]) == (1.0, 0.5)
    assert s["f1"] == pytest.approx(2 / 3)
    assert metrics.normalize_answer("  The  Eiffel, Tower! ") == "eiffel tower"


def test_squad_unanswerable_target_is_no_answer():
    # The model says the target string for unanswerable questions; gold lists are empty for them.
    for pred in ("unanswerable", "Unanswerable.", " UNANSWERABLE "):
        assert metrics.squad_scores(pred, []) == {"em": 1.0, "f1": 1.0, "precision": 1.0, "recall": 1.0}
        assert metrics.squad_scores(pred, ["unanswerable"])["em"] == 1.0
    assert metrics.squad_scores("Paris", [])["f1"] == 0.0
    assert metrics.squad_scores("unanswerable", ["Paris"]) == {"em": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    # Without the mapping it is an ordinary (wrong) answer to an unanswerable question.
    assert metrics.squad_scores("unanswerable", [], unanswerable=None)["em"] == 0.0
    assert metrics.squad_scores("no answer", [], unanswerable="no answer")["em"] == 1.0


def test_score_examples_per_example_arrays():
    out = metrics.score_examples(["the cat sat", "unanswerable"], [["the cat sat"], ["unanswerable"]], qa=True)
    assert set(out) == {"bleu4", "gleu", "meteor", "em", "f1", "precision", "recall"}
    assert out["em"].tolist() == [1.0, 1.0]
    assert out["bleu4"][0] == pytest.approx(metrics.bleu4("the cat sat", ["the cat sat"]))
    assert set(metrics.score_examples(["a"], [["a"]])) == {"bleu4", "gleu", "meteor"}
    with pytest.raises(ValueError):
        metrics.score_examples(["a", "b"], [["a"]])


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_covers_mean_and_narrows_with_n():
    rng = np.random.default_rng(3)
    small, large = rng.normal(2.0, 1.0, 40), rng.normal(2.0, 1.0, 4000)
    mean_s, low_s, high_s = metrics.bootstrap_ci(small, 2000, 0.95, seed=1)
    mean_l, low_l, high_l = metrics.bootstrap_ci(large, 2000, 0.95, seed=1)
    assert mean_s == pytest.approx(small.mean()) and low_s < mean_s < high_s
    assert low_l < mean_l < high_l
    # The width shrinks like 1/sqrt(n): 100x the data -> about 1/10 the width.
    ratio = (high_l - low_l) / (high_s - low_s)
    assert 0.06 < ratio < 0.16
    # The normal-theory width 2 * 1.96 * s / sqrt(n) is what the percentile interval should approach.
    assert high_l - low_l == pytest.approx(2 * 1.96 * large.std() / np.sqrt(large.size), rel=0.1)


def test_bootstrap_ci_is_seeded():
    values = np.arange(30.0)
    assert metrics.bootstrap_ci(values, 500, 0.9, seed=7) == metrics.bootstrap_ci(values, 500, 0.9, seed=7)
    assert metrics.bootstrap_ci(values, 500, 0.9, seed=7) != metrics.bootstrap_ci(values, 500, 0.9, seed=8)
    wide = metrics.bootstrap_ci(values, 500, 0.99, seed=7)
    narrow = metrics.bootstrap_ci(values, 500, 0.5, seed=7)
    assert wide[1] < narrow[1] and narrow[2] < wide[2]


def test_bootstrap_ci_coverage_is_near_nominal():
    # 300 data sets of 60 Bernoulli(0.3) draws: about 95% of the intervals should hold 0.3.
    rng = np.random.default_rng(0)
    hits = 0
    for k in range(300):
        data = (rng.random(60) < 0.3).astype(float)
        _, low, high = metrics.bootstrap_ci(data, 400, 0.95, seed=k)
        hits += low <= 0.3 <= high
    assert 0.88 <= hits / 300 <= 0.99


def test_bootstrap_ci_rejects_bad_input():
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([], 100, 0.95, 0)
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([1.0, float("nan")], 100, 0.95, 0)
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([1.0, 2.0], 100, 1.5, 0)


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(5)
    difficulty = rng.random(200)  # shared per-example difficulty cancels in the pairing
    b = difficulty + rng.normal(0, 0.02, 200)
    a = difficulty + 0.05 + rng.normal(0, 0.02, 200)
    out = metrics.paired_bootstrap_diff(a, b, 2000, 0.95, seed=0)
    assert out["diff"] == pytest.approx(float(np.mean(a - b)))
    assert 0.0 < out["low"] < 0.05 < out["high"]
    assert out["p_not_better"] < 0.01
    # Unpaired intervals would overlap heavily; the paired one is far narrower than either system's.
    _, low_a, high_a = metrics.bootstrap_ci(a, 2000, 0.95, 0)
    assert out["high"] - out["low"] < (high_a - low_a) / 5
    same = metrics.paired_bootstrap_diff(b, b, 500, 0.95, 0)
    assert same["diff"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0
    with pytest.raises(ValueError, match="same examples"):
        metrics.paired_bootstrap_diff(a, b[:10])
