"""Crash-safe file writing: write to a temporary file in the same folder, fsync, then rename.

A reader therefore sees either the old file or the complete new one, never half of it, and a
failed write (disk full, kill) leaves any previous file untouched. A killed write does leave its
temporary behind; :func:`remove_stale_temporaries` clears those (and finishes a folder swap cut
between its two renames) once no write can be in progress, e.g. when a resumed stage starts.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

log = logging.getLogger(__name__)

# Every temporary made here carries this mark, so that clearing stale ones can never catch a user's
# own file: ".<name>.selfrank-<random>.tmp" (a file), ".<name>.selfrank.tmp-<random>" (a folder being
# written) and ".<name>.selfrank.old-<random>" (a folder's previous version, moved aside for the swap).
_MARK = "selfrank"
_RANDOM = r"[A-Za-z0-9_]+"  # tempfile's random part
_FILE_TEMP = re.compile(rf"\.(?P<target>.+)\.{_MARK}-{_RANDOM}\.tmp")
_FOLDER_TEMP = re.compile(rf"\.(?P<target>.+)\.{_MARK}\.tmp-{_RANDOM}")
_FOLDER_OLD = re.compile(rf"\.(?P<target>.+)\.{_MARK}\.old-{_RANDOM}")
_PREVIOUS = "previous"  # the old version's name inside its ".old-" folder

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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_MARK}-", suffix=".tmp", dir=path.parent)
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


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``folder`` (old one removed)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{_MARK}.tmp-", dir=folder.parent))
    try:
        with naming_disk_full(folder):
            yield tmp
        old = None
        if folder.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{_MARK}.old-", dir=folder.parent))
            os.replace(folder, old / _PREVIOUS)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = True,
                             target: str | None = None) -> list[Path]:
    """Clear what killed atomic writes left in ``folder`` (and below it if ``recursive``); returns
    the paths removed. With ``target``, only the temporaries of writes to that name.

    Call it only where no atomic write under ``folder`` can be in progress (a stage's folder as the
    stage starts, before any other process of the job goes on): it would pull a live write's
    temporary away. A folder whose swap was cut between its two renames (old version moved aside,
    new one not yet in place) gets its old version back, as if that write had never started.
    Only names with this module's mark are touched, never a file of the user's.
    """
    removed: list[Path] = []
    for parent, dirs, files in os.walk(folder):  # symbolic links are not followed
        here = Path(parent)
        def ours(pattern: re.Pattern, name: str) -> bool:
            match = pattern.fullmatch(name)
            return bool(match) and (target is None or match.group("target") == target)

        for name in files:
            if ours(_FILE_TEMP, name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(here / name)
                removed.append(here / name)
        stale = [d for d in dirs if (ours(_FOLDER_TEMP, d) or ours(_FOLDER_OLD, d)) and not (here / d).is_symlink()]
        _restore_cut_swaps(here, [d for d in stale if _FOLDER_OLD.fullmatch(d)])
        for name in stale:
            shutil.rmtree(here / name, ignore_errors=True)
            removed.append(here / name)
        dirs[:] = [d for d in dirs if d not in stale] if recursive else []
    if removed:
        log.info("removed %d temporar%s left by interrupted writes under %s", len(removed),
                 "y" if len(removed) == 1 else "ies", folder)
    return removed


def _restore_cut_swaps(here: Path, olds: list[str]) -> None:
    """Put back the previous version of each folder in ``here`` that a cut swap left missing."""
    by_target: dict[str, list[Path]] = {}
    for name in olds:
        if (here / name / _PREVIOUS).is_dir():
            by_target.setdefault(_FOLDER_OLD.fullmatch(name)["target"], []).append(here / name)
    for target, candidates in by_target.items():
        if (here / target).exists() or (here / target).is_symlink():
            continue  # the swap completed: the old version is garbage
        newest = max(candidates, key=lambda p: p.stat().st_mtime_ns)
        os.replace(newest / _PREVIOUS, here / target)
        _fsync_dir(here)
        log.warning("%s: a write was interrupted mid-swap; its previous version is back in place", here / target)
