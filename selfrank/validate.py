"""Small checks used by every typed config's ``__post_init__``; each raises ``UserError``."""
from __future__ import annotations

from selfrank.errors import UserError


def check_range(name: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> None:
    """Raise unless ``low (<|<=) value (<|<=) high``; ``None`` bounds are unbounded."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name}: expected a number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise UserError(f"{name}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise UserError(f"{name}: must be {'<' if high_open else '<='} {high}, got {value}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{name}: must be one of {', '.join(map(str, choices))}; got {value!r}")
