"""Control rows of the report: what the SFT model reaches with no training beyond SFT.

STR's PPO could beat SFT's sampled answers merely by making the policy sample more greedily, or by
moving it toward the answer its own samples agree on, which inference-time consensus gets for free.
Two rows from the SFT model tell those apart from a learned gain:

* ``sft_greedy``: greedy decoding (argmax at every step), one answer per prompt.
* ``sft_majority``: self-consistency: K answers sampled as the sample stage samples them, and the
  most frequent one after SQuAD normalisation (case, punctuation, articles) is the answer. Free text
  rarely repeats verbatim, so frequency ties, all-distinct groups included, go to the answer with the
  highest mean word-overlap F1 with the rest of its group (the lexical consensus pick, i.e. minimum
  Bayes risk under F1), then to the earliest. Same K and decoding as STR's groups: this is what
  "rank K samples and keep the consensus answer" gives without any reward model or PPO.

* ``sft_rerank_<variant>``: best of K with the variant's reward model, at inference: of the same K
  answers, the one the reward model scores highest (no PPO), which isolates the reward signal.

Each STR variant is decoded greedily too (``<variant>_greedy``) and paired against SFT greedy, so a gain
can be read at equal decoding: sampled vs sampled (against SFT) and greedy vs greedy (against SFT greedy).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from selfrank.train.evaluation.metrics import normalize_answer

GREEDY_ROW = "sft_greedy"
MAJORITY_ROW = "sft_majority"
GREEDY_SUFFIX = "_greedy"
# Each STR variant is also decoded greedily (row ``<variant>_greedy``) and paired against SFT greedy: a
# gain that survives there is not "PPO made sampling greedier".
PAIRED_BASELINES = {"paired_vs_sft": "sft", "paired_vs_sft_greedy": GREEDY_ROW}


def greedy_twin(row: str) -> str:
    return row + GREEDY_SUFFIX


def paired_baseline(row: str) -> str:
    """The row a row is paired against: SFT greedy for a greedy twin of a trained row, else SFT."""
    return GREEDY_ROW if row.endswith(GREEDY_SUFFIX) and row != GREEDY_ROW else "sft"


def paired_sets(rows, scores_of, diff) -> dict[str, dict]:
    """``{"paired_vs_sft": {row: diff(row, "sft")}, "paired_vs_sft_greedy": {...}}`` for every row whose
    baseline (:func:`paired_baseline`) is among ``rows``; ``diff(a, b)`` computes the per-metric CIs."""
    out: dict[str, dict] = {key: {} for key in PAIRED_BASELINES}
    for key, base in PAIRED_BASELINES.items():
        if base not in rows:
            continue
        for row in rows:
            if row != base and paired_baseline(row) == base:
                out[key][row] = diff(scores_of(row), scores_of(base))
    return out


def _overlap_f1(a: list[str], b: list[str]) -> float:
    """Word-overlap F1 of two token lists (both empty: 1, one empty: 0)."""
    if not a or not b:
        return float(a == b)
    same = sum((Counter(a) & Counter(b)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(a), same / len(b)
    return 2 * precision * recall / (precision + recall)


def majority_pick(answers: Sequence[str]) -> int:
    """Index of the group's majority answer: most frequent normalised form; ties -> highest mean
    word-overlap F1 with the other answers; then the earliest."""
    if not answers:
        raise ValueError("majority_pick: empty group")
    forms = [normalize_answer(a) for a in answers]
    counts = Counter(forms)
    tokens = [f.split() for f in forms]

    def consensus(i: int) -> float:
        others = [j for j in range(len(answers)) if j != i]
        return sum(_overlap_f1(tokens[i], tokens[j]) for j in others) / max(1, len(others))

    return max(range(len(answers)), key=lambda i: (counts[forms[i]], consensus(i), -i))


def majority_answers(texts: Sequence[str], k: int) -> list[str]:
    """``k`` consecutive answers per prompt -> each prompt's majority answer."""
    if k < 1 or len(texts) % k:
        raise ValueError(f"majority_answers: {len(texts)} answers are not groups of {k}")
    groups = [texts[i:i + k] for i in range(0, len(texts), k)]
    return [group[majority_pick(group)] for group in groups]
