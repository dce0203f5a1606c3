"""Dropping a trailing incomplete sentence."""
from __future__ import annotations

import pytest

from selfrank.ranking.cleanup import drop_incomplete_sentence


@pytest.mark.parametrize(
    "text, expected",
    [
        ("It rains. Take an umb", "It rains."),
        ("Yes! Really? And then the", "Yes! Really?"),
        ('He said "go." And the', 'He said "go."'),
        ("He asked (why?) then", "He asked (why?)"),
        ("It costs 3.5 dollars. The rest is", "It costs 3.5 dollars."),
        ("First line.\nSecond line without end", "First line."),
        ("Wait\u2026 what", "Wait\u2026"),
    ],
)
def test_trailing_fragment_is_dropped(text, expected):
    assert drop_incomplete_sentence(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "It rains. Take an umbrella.",
        "Is it? Yes!",
        'She said "fine."',
        "Ends with a quote.'  ",
        "no punctuation at all",
        "It costs 3.5 dollars",  # a decimal point is no sentence end
        "",
        "   ",
        ". and then",  # dropping would leave no content
    ],
)
def test_text_is_kept_when_nothing_complete_precedes_or_it_is_complete(text):
    assert drop_incomplete_sentence(text) == text


def test_never_returns_empty_for_content():
    for text in ["a", "word", "?", "!! x", "... y"]:
        assert drop_incomplete_sentence(text).strip()
