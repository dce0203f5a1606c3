"""Crash-safe file writing: write to a temporary file in the same folder, fsync, then rename.

A reader therefore sees either the old file or the complete new one, never half of it, and a
failed write (disk full, kill) leaves any previous file untouched.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator


# No space left, over the file size limit, over quota.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_OS_ERROR_CODE = re.compile(r"os error (\d+)")
_DISK_FULL_TEXTS = {"No space left on device": errno.ENOSPC, "File too large": errno.EFBIG,
                    # torch.save's zip writer reports a short write without its errno.
                    "unexpected pos": errno.ENOSPC, "file write failed": errno.ENOSPC}


def disk_full_errno(exc: BaseException) -> int | None:
    """The errno when ``exc`` is a disk-full kind of write failure, else None (native writers such as
    safetensors and torch report it only in their message)."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in DISK_FULL_ERRNOS else None
    text = str(exc)
    match = _OS_ERROR_CODE.search(text)
    if match and int(match.group(1)) in DISK_FULL_ERRNOS:
        return int(match.group(1))
    return next((code for key, code in _DISK_FULL_TEXTS.items() if key in text), None)


@contextlib.contextmanager
def naming_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a disk-full failure inside the block as ``OSError(errno, ..., path)``, so that the
    report names what was being written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or disk_full_errno(exc) is None:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
    except Exception as exc:
        code = disk_full_errno(exc)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from exc


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with naming_disk_full(path), os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; not every filesystem allows opening a folder.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines atomically; returns the number of rows written."""
    count = 0
    with atomic_open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
