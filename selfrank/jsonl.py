"""Strict JSON-lines reading: every problem is a ``UserError`` naming ``file:line``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from selfrank.errors import UserError


def read_jsonl(path: str | os.PathLike, max_line_bytes: int = 16 * 1024 * 1024) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Raises ``UserError`` for a missing file, non-UTF-8 bytes, invalid JSON, a non-object line,
    an over-long line, or a file with no rows at all.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    seen = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if len(raw) > max_line_bytes:
                raise UserError(f"{path}:{number}: line longer than {max_line_bytes} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            seen += 1
            yield number, obj
    if seen == 0:
        raise UserError(f"{path}: no rows (the file is empty)")


def read_appended_rows(path: str | os.PathLike) -> Iterator[dict]:
    """The rows of a file this project appends to while it works (progress files, the PPO log), up to a
    torn last line: a kill mid-write leaves one partial line, and everything before it is intact.
    A missing file has no rows."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return
