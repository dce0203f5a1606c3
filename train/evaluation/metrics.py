"""Text metrics scored per example, so that every reported mean comes with a bootstrap interval.

Choices the paper leaves open, fixed here:

* Tokenisation for BLEU / GLEU / METEOR: ``tokenize`` lower-cases (unless asked not to) and splits
  into runs of word characters and single punctuation marks (``\\w+|[^\\w\\s]``). NLTK's
  ``word_tokenize`` would need the Punkt model, which is one more download; this regex gives the same
  split for ordinary English apart from contractions.
* BLEU-4: NLTK ``sentence_bleu`` with uniform weights (0.25 x 4) and Chen & Cherry's smoothing
  ``SmoothingFunction().method1`` (add epsilon = 0.1 to zero n-gram match counts). Without smoothing a
  short answer with no matching 4-gram scores exactly 0, which makes sentence-level BLEU useless on
  dialogue. Corpus BLEU from sacreBLEU (default 13a tokeniser, mixed case, 0-100 scale) is reported
  beside it as the number other papers can compare against.
* GLEU: NLTK ``sentence_gleu`` (Google-BLEU, n = 1..4): min(precision, recall) of the n-gram matches.
* METEOR: NLTK ``meteor_score`` (exact, Porter stem and WordNet synonym matching; alpha 0.9, beta 3,
  gamma 0.5), the best score over the references. It needs WordNet; when WordNet is missing it raises
  ``UserError`` instead of quietly scoring without synonyms.
* SQuAD: the official v2.0 evaluation script's answer normalisation and EM / F1 (lower-case, drop
  punctuation, drop the articles a / an / the, collapse whitespace; tokens = whitespace split of the
  normalised text; max over the gold answers). Precision and recall, which the official script does
  not report, are those of the gold answer giving the best F1. The no-answer case follows the script:
  a prediction or gold answer that normalises to nothing is "no answer", F1 is 1 when both sides are
  no-answer and 0 when only one is. Our models answer unanswerable questions with a target string
  (``task.unanswerable_target``), which is therefore read as "no answer" on both sides.
"""
from __future__ import annotations

import collections
import functools
import gc
import re
import string
import warnings
from typing import Sequence

import numpy as np

from selfrank.errors import UserError

BLEU_WEIGHTS = (0.25, 0.25, 0.25, 0.25)
TEXT_METRICS = ("bleu4", "gleu", "meteor")
QA_METRICS = ("em", "f1", "precision", "recall")
# Tasks with short checkable answers, scored with SQuAD EM/F1 on top of the text metrics.
EXACT_ANSWER_TASKS = ("qa", "synthetic")

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Word and punctuation tokens of ``text`` (see the module docstring)."""
    return _TOKEN.findall(text.lower() if lowercase else text)


def _tokenized(hypothesis: str, references: Sequence[str], lowercase: bool) -> tuple[list[str], list[list[str]]]:
    if isinstance(references, str) or not references:
        raise ValueError("references: expected a non-empty list of strings")
    return tokenize(hypothesis, lowercase), [tokenize(r, lowercase) for r in references]


def bleu4(hypothesis: str, references: Sequence[str], lowercase: bool = True) -> float:
    """Sentence BLEU-4 in [0, 1] (NLTK, weights 0.25 x 4, smoothing method1)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp, refs = _tokenized(hypothesis, references, lowercase)
    with warnings.catch_warnings():
        # NLTK warns on every empty or very short hypothesis; the score (0 or smoothed) is what we want.
        warnings.simplefilter("ignore")
        return float(sentence_bleu(refs, hyp, weights=BLEU_WEIGHTS, smoothing_function=SmoothingFunction().method1))


def gleu(hypothesis: str, references: Sequence[str], lowercase: bool = True) -> float:
    """Sentence GLEU (Google-BLEU, n-grams 1..4) in [0, 1], NLTK ``sentence_gleu``."""
    from nltk.translate.gleu_score import sentence_gleu

    hyp, refs = _tokenized(hypothesis, references, lowercase)
    return float(sentence_gleu(refs, hyp, min_len=1, max_len=4))


def wordnet_home() -> str:
    """Where the set-up puts WordNet: ``<sys.prefix>/share/nltk_data``, a folder NLTK always searches, so
    the environment's own Python finds it from any directory, in any job, with no variable set."""
    import os
    import sys

    return os.path.join(sys.prefix, "share", "nltk_data")


@functools.lru_cache(maxsize=1)
def require_wordnet():
    """The English WordNet reader METEOR matches synonyms with, or ``UserError`` saying how to provide it.

    Loaded directly rather than through ``nltk.corpus.wordnet``: NLTK's loader also builds a mapping of
    WordNet onto itself for the multilingual (OMW) functions, re-reading ``index.sense`` twice, which
    doubles the load time and is never used by METEOR.
    """
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class EnglishWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None

    try:
        root = nltk.data.find("corpora/wordnet")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available": intended
            reader = EnglishWordNet(root, None)
        if not reader.synsets("dog"):
            raise LookupError("WordNet loaded but has no synsets for 'dog'")
        # WordNet's ~450,000 objects live as long as the process. Frozen, they are left out of every later
        # garbage collection (one per evaluated model, one per stage's end in accelerate), each of which
        # would otherwise walk them again (measured 0.27 s a collection). Collected first, so nothing that is
        # garbage now is kept; objects alive now are still freed when their last reference goes.
        gc.collect()
        gc.freeze()
    except (LookupError, OSError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if re.search(r"[A-Za-z]", ln)]
        first = lines[0] if lines else type(exc).__name__
        raise UserError(
            "METEOR needs WordNet, which NLTK cannot load (searched: "
            + ", ".join(map(str, nltk.data.path))
            + f"; {first}). Build it where NLTK looks with `python -m selfrank.launch.setup_wordnet` (into "
            + f"{wordnet_home()}), or build it elsewhere with `python -m selfrank.launch.setup_wordnet DEST` and "
            "set NLTK_DATA=DEST"
        ) from None
    return reader


def meteor(hypothesis: str, references: Sequence[str], lowercase: bool = True) -> float:
    """METEOR in [0, 1] against the best of several references (NLTK, with WordNet synonyms)."""
    from nltk.translate.meteor_score import meteor_score

    wordnet = require_wordnet()
    hyp, refs = _tokenized(hypothesis, references, lowercase)
    return float(meteor_score(refs, hyp, wordnet=wordnet))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacreBLEU corpus BLEU (0-100) for ``hypotheses[i]`` against the list ``references[i]``.

    Examples may have different numbers of references; missing ones are passed as ``None``, which
    sacreBLEU skips.
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("corpus_bleu: no hypotheses")
    width = max(len(r) for r in references)
    if width == 0:
        raise ValueError("corpus_bleu: every example needs at least one reference")
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


# ----------------------------------------------------------------------------- SQuAD v2.0


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD v2.0 normalisation: lower, drop punctuation, drop a/an/the, fix whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.UNICODE)
    return " ".join(text.split())


def _answer_tokens(text: str, unanswerable: str | None) -> list[str]:
    normalized = normalize_answer(text)
    if unanswerable is not None and normalized == normalize_answer(unanswerable):
        return []
    return normalized.split()


def _prf(gold: list[str], pred: list[str]) -> tuple[float, float, float]:
    if not gold or not pred:
        agree = float(gold == pred)  # official rule: both no-answer -> 1, one no-answer -> 0
        return agree, agree, agree
    same = sum((collections.Counter(gold) & collections.Counter(pred)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    precision, recall = same / len(pred), same / len(gold)
    return precision, recall, 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, gold_answers: Sequence[str], unanswerable: str | None = "unanswerable") -> dict:
    """EM, F1, precision and recall of one prediction, as the official SQuAD v2.0 script scores it.

    Gold answers that normalise to nothing, and an empty list, mean "no answer" (the script's ``['']``);
    ``unanswerable`` (the task's target string for such questions) is read as "no answer" on both sides.
    """
    if isinstance(gold_answers, str):
        raise ValueError("gold_answers: expected a list of strings")
    golds = [_answer_tokens(g, unanswerable) for g in gold_answers]
    golds = [g for g in golds if g] or [[]]
    pred = _answer_tokens(prediction, unanswerable)
    em = max(float(g == pred) for g in golds)  # equal token lists <=> equal normalised strings
    best = max((_prf(g, pred) for g in golds), key=lambda prf: prf[2])
    return {"em": em, "f1": best[2], "precision": best[0], "recall": best[1]}


# ----------------------------------------------------------------------------- per-example scoring


def score_examples(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, qa: bool = False,
                   unanswerable: str | None = "unanswerable", lowercase: bool = True) -> dict[str, np.ndarray]:
    """Per-example arrays for every metric: BLEU-4, GLEU, METEOR, and for ``qa`` EM / F1 / P / R."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    names = TEXT_METRICS + (QA_METRICS if qa else ())
    out = {name: np.zeros(len(hypotheses), dtype=np.float64) for name in names}
    functions = {"bleu4": bleu4, "gleu": gleu, "meteor": meteor}
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        for name in TEXT_METRICS:
            out[name][i] = functions[name](hyp, refs, lowercase)
        if qa:
            for name, value in squad_scores(hyp, refs, unanswerable).items():
                out[name][i] = value
    return out


# ----------------------------------------------------------------------------- bootstrap


def _resample_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator, chunk: int = 1 << 22) -> np.ndarray:
    """Means of ``n_resamples`` resamples with replacement, in chunks to bound memory."""
    n = values.shape[-1]
    rows = max(1, chunk // max(n, 1))
    means = []
    for start in range(0, n_resamples, rows):
        idx = rng.integers(0, n, size=(min(rows, n_resamples - start), n))
        means.append(values[..., idx].mean(axis=-1))
    return np.concatenate(means, axis=-1)


def _check(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of numbers")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinity")
    return arr


def bootstrap_ci(values, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the sample mean and its percentile-bootstrap interval (seeded)."""
    arr = _check(values, "values")
    if n_resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("bootstrap_ci: need n_resamples >= 1 and 0 < confidence < 1")
    means = _resample_means(arr, n_resamples, np.random.default_rng(seed))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(arr.mean()), float(low), float(high)


def paired_bootstrap_diff(a, b, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Difference ``mean(a) - mean(b)`` of two systems scored on the same examples.

    Resamples examples (not systems) so that per-example difficulty cancels out. Returns ``diff``,
    the percentile interval ``low`` / ``high``, and ``p_not_better``: the share of resamples in which
    ``a`` does not beat ``b`` (a one-sided bootstrap p-value for "a is better").
    """
    x, y = _check(a, "a"), _check(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired_bootstrap_diff: {x.size} vs {y.size} values; pairs need the same examples")
    if n_resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("paired_bootstrap_diff: need n_resamples >= 1 and 0 < confidence < 1")
    diffs = _resample_means(x - y, n_resamples, np.random.default_rng(seed))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
    return {"diff": float((x - y).mean()), "low": float(low), "high": float(high),
            "p_not_better": float(np.mean(diffs <= 0.0))}
