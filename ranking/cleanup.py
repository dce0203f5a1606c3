"""Post-processing of sampled answers before ranking.

Sampling stops at a token budget, so an answer often ends mid-sentence. The authors dropped such a
trailing fragment; a fragment would otherwise pull its answer's embedding towards noise.
"""
from __future__ import annotations

import re

# Terminal punctuation, optionally followed by closing quotes or brackets.
_TERMINAL = r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]\u00bb]*"
_ENDS_COMPLETE = re.compile(_TERMINAL + r"\s*$")
# A sentence end inside the text: terminal punctuation (+ closers) followed by whitespace.
_SENTENCE_END = re.compile(_TERMINAL + r"(?=\s)")


def drop_incomplete_sentence(text: str) -> str:
    """Drop a trailing sentence fragment if an earlier sentence is complete.

    "It rains. Take an umb" -> "It rains."; "It rains." and "no punctuation at all" are returned
    unchanged (a text that would become empty is kept whole). A period inside a token, as in
    "3.5" or "e.g.," is not a sentence end; "e.g. " followed by a space is (an accepted false hit).
    """
    if not text.strip() or _ENDS_COMPLETE.search(text):
        return text
    last_end = None
    for match in _SENTENCE_END.finditer(text):
        last_end = match.end()
    if last_end is None:
        return text
    kept = text[:last_end]
    return kept if kept.strip(" \t\r\n.!?") else text
