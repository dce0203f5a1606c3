"""Logging helpers every room may use."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def quieter(logger_name: str, level: int) -> Iterator[None]:
    """Raise a library logger's threshold to ``level`` for a block (its routine notices are noise in
    every stage's log), then restore it."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(max(previous, level))
    try:
        yield
    finally:
        logger.setLevel(previous)
