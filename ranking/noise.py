"""The "+ noise" variant: perturb the LOSER of a pair so the reward model sees worse-than-sampled
answers (broken n-grams, flipped negation, scrambled order) ranked below a good one.

Every kind is seeded through the caller's ``np.random.Generator``; a kind that cannot change a
given text (no repeated content, one word, ...) is replaced by another, so an applied
perturbation always changes the words of the text.
"""
from __future__ import annotations

import re

import numpy as np

from selfrank.ranking.config import NoiseConfig

NGRAM_KINDS = ("ngram_delete", "ngram_replace", "ngram_insert")
KINDS = NGRAM_KINDS + ("negation", "shuffle")
MAX_N = 3  # n-gram edits use n < 4

# Negation hooks, longest first so that "can't" wins over "can" and "is not" over "is".
_NEGATION_FLIPS: dict[str, str] = {
    "is not": "is", "are not": "are", "was not": "was", "were not": "were", "do not": "do",
    "does not": "does", "did not": "did", "will not": "will", "would not": "would",
    "should not": "should", "could not": "could", "can not": "can", "has not": "has",
    "have not": "have", "had not": "had", "must not": "must", "may not": "may", "might not": "might",
    "am not": "am",
    "isn't": "is", "aren't": "are", "wasn't": "was", "weren't": "were", "don't": "do",
    "doesn't": "does", "didn't": "did", "won't": "will", "wouldn't": "would", "shouldn't": "should",
    "couldn't": "could", "can't": "can", "cannot": "can", "hasn't": "has", "haven't": "have",
    "hadn't": "had", "mustn't": "must", "ain't": "is",
    "never": "always", "always": "never", "nobody": "somebody", "somebody": "nobody",
    "nothing": "something", "something": "nothing", "none": "all", "yes": "no", "no": "yes",
    "is": "is not", "are": "are not", "was": "was not", "were": "were not", "am": "am not",
    "can": "cannot", "will": "will not", "would": "would not", "should": "should not",
    "could": "could not", "must": "must not", "do": "do not", "does": "does not", "did": "did not",
    "may": "may not", "might": "might not", "not": "",
}
_NEGATION_RE = re.compile(
    r"(?<![\w'\u2019])("
    + "|".join(re.escape(k).replace("'", "['\u2019]").replace(r"\ ", r"\s+")
               for k in sorted(_NEGATION_FLIPS, key=len, reverse=True))
    + r")(?![\w'\u2019])",
    re.IGNORECASE,
)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?\u2026])[\"'\u201d\u2019)]*\s+")


def _words(text: str) -> list[str]:
    return text.split()


def _same_words(a: str, b: str) -> bool:
    return _words(a) == _words(b)


def _match_case(src: str, repl: str) -> str:
    if not repl:
        return repl
    if src.isupper() and len(src) > 1:
        return repl.upper()
    if src[:1].isupper():
        return repl[:1].upper() + repl[1:]
    return repl


def _ngram_delete(text, rng):
    words = _words(text)
    ns = [n for n in range(1, MAX_N + 1) if n < len(words)]  # keep at least one word
    if not ns:
        return None
    n = int(rng.choice(ns))
    pos = int(rng.integers(0, len(words) - n + 1))
    removed = words[pos:pos + n]
    return " ".join(words[:pos] + words[pos + n:]), {"n": n, "position": pos, "removed": " ".join(removed)}


def _ngram_replace(text, rng):
    """Replace an n-gram with another n-gram of the same text, or with its own words shuffled."""
    words = _words(text)
    options = []
    for n in range(1, min(MAX_N, len(words)) + 1):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        for pos, gram in enumerate(grams):
            if any(other != gram for other in grams) or (n > 1 and len(set(gram)) > 1):
                options.append((n, pos))
    if not options:
        return None
    n, pos = options[int(rng.integers(len(options)))]
    gram = words[pos:pos + n]
    sources = sorted({tuple(words[i:i + n]) for i in range(len(words) - n + 1)} - {tuple(gram)})
    shuffled = None
    if n > 1 and len(set(gram)) > 1:
        perm = list(rng.permutation(n))
        if perm == list(range(n)):
            perm = perm[1:] + perm[:1]
        shuffled = [gram[i] for i in perm]
    use_shuffle = shuffled is not None and (not sources or rng.random() < 0.5)
    new = shuffled if use_shuffle else list(sources[int(rng.integers(len(sources)))])
    detail = {"n": n, "position": pos, "old": " ".join(gram), "new": " ".join(new),
              "source": "shuffle" if use_shuffle else "copy"}
    return " ".join(words[:pos] + new + words[pos + n:]), detail


def _ngram_insert(text, rng):
    """Insert a duplicate of one of the text's n-grams at another position."""
    words = _words(text)
    if not words:
        return None
    n = int(rng.integers(1, min(MAX_N, len(words)) + 1))
    src = int(rng.integers(0, len(words) - n + 1))
    at = int(rng.integers(0, len(words) + 1))
    gram = words[src:src + n]
    return " ".join(words[:at] + gram + words[at:]), {"n": n, "source": src, "position": at, "inserted": " ".join(gram)}


def _negation(text, rng):
    """Flip one negation hook ("is" <-> "is not", "never" <-> "always", ...); with no hook,
    prepend "No," or "Not"."""
    if not text.strip():
        return None
    hooks = list(_NEGATION_RE.finditer(text))
    if hooks:
        match = hooks[int(rng.integers(len(hooks)))]
        found = match.group(1)
        key = re.sub(r"\s+", " ", found.lower().replace("\u2019", "'"))
        repl = _match_case(found, _NEGATION_FLIPS[key])
        start, end = match.span(1)
        if not repl:  # removed "not": also drop one adjacent space
            if end < len(text) and text[end] == " ":
                end += 1
            elif start > 0 and text[start - 1] == " ":
                start -= 1
        return text[:start] + repl + text[end:], {"hook": found, "replacement": repl, "position": start}
    lead = len(text) - len(text.lstrip())
    body = text[lead:]
    # The body keeps its case: lowering "Paris" would corrupt more than the negation.
    prefix = "No, " if rng.random() < 0.5 else "Not "
    return text[:lead] + prefix + body, {"hook": None, "replacement": prefix.strip(), "position": 0}


def _shuffle(text, rng):
    """Permute the sentences; a single sentence gets two of its (different) words swapped."""
    sentences = [s for s in _SENTENCE_SPLIT.split(text.strip()) if s]
    if len(sentences) >= 2 and len(set(sentences)) >= 2:
        perm = [int(i) for i in rng.permutation(len(sentences))]
        if perm == list(range(len(sentences))) or [sentences[i] for i in perm] == sentences:
            perm = perm[1:] + perm[:1]
        if [sentences[i] for i in perm] == sentences:  # e.g. A A B rotated onto itself
            perm = list(range(len(sentences)))[::-1]
        new = [sentences[i] for i in perm]
        if new != sentences:
            return " ".join(new), {"unit": "sentence", "permutation": perm}
    words = _words(text)
    pairs = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words)) if words[i] != words[j]]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    words[i], words[j] = words[j], words[i]
    return " ".join(words), {"unit": "word", "swap": [i, j]}


_APPLY = {
    "ngram_delete": _ngram_delete,
    "ngram_replace": _ngram_replace,
    "ngram_insert": _ngram_insert,
    "negation": _negation,
    "shuffle": _shuffle,
}


def kind_weights(config: NoiseConfig) -> dict[str, float]:
    """Per-kind weights: the n-gram weight is shared equally by its three edits."""
    w = config.ngram_weight / len(NGRAM_KINDS)
    return {**{k: w for k in NGRAM_KINDS}, "negation": config.negation_weight, "shuffle": config.shuffle_weight}


def apply_kind(kind: str, text: str, rng: np.random.Generator) -> tuple[str, dict] | None:
    """One perturbation of ``kind``; None if it cannot change the words of ``text``."""
    out = _APPLY[kind](text, rng)
    if out is None or _same_words(out[0], text) or not out[0].strip():
        return None
    return out


def perturb(text: str, rng: np.random.Generator, config: NoiseConfig) -> tuple[str, dict | None]:
    """Perturb ``text`` with one kind drawn by weight; retry the remaining kinds if it is a no-op.

    Returns ``(new_text, {"kind", "text", "detail"})``, or ``(text, None)`` when no kind with a
    positive weight can change it (an empty text).
    """
    weights = {k: w for k, w in kind_weights(config).items() if w > 0}
    while weights:
        names = list(weights)
        p = np.array([weights[k] for k in names], dtype=np.float64)
        kind = names[int(rng.choice(len(names), p=p / p.sum()))]
        out = apply_kind(kind, text, rng)
        if out is not None:
            new_text, detail = out
            return new_text, {"kind": kind, "text": new_text, "detail": detail}
        del weights[kind]
    return text, None
