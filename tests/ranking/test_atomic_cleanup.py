"""What killed atomic writes leave behind, and its removal: real processes killed at chosen points
(each stops itself there, so the kill lands exactly where intended, whatever the speed)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from selfrank.atomic import atomic_folder, atomic_open, remove_stale_temporaries, write_text


def _killed_at(work, stop_when=None) -> None:
    """Run ``work`` in a child process that stops itself when ``stop_when(event, args)`` holds for an
    audit event (or where ``work`` itself stops it); SIGKILL it there."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            if stop_when is not None:
                sys.addaudithook(lambda event, args: stop_when(event, args) and os.kill(os.getpid(), signal.SIGSTOP))
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "the child finished before the point it was to be killed at"
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _stop_here() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def _fill(folder: Path, text: str) -> None:
    (folder / "weights.txt").write_text(text)


def _write_folder(folder: Path, text: str) -> None:
    with atomic_folder(folder) as tmp:
        _fill(tmp, text)


def _marked(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if "selfrank" in p.name)


def test_killed_writes_leave_temporaries_that_cleanup_removes_undoing_a_cut_swap(tmp_path):
    root = tmp_path / "run"
    write_text(root / "notes.txt", "old notes")
    for name in ("sub/model", "checkpoint", "sub/final"):
        _write_folder(root / name, "v1")
    # The user's own files, named like temporaries but without this project's mark: never touched.
    own = [root / ".notes.txt.abcd1234.tmp", root / "sub" / "a.selfrank-abcd1234.tmp", root / ".keep.selfrank.tmp"]
    own_folders = [root / "sub" / ".model.tmp-abcd1234", root / ".checkpoint.old-abcd1234", root / "x.selfrank.tmp-1"]
    for path in own:
        path.write_text("mine")
    for path in own_folders:
        path.mkdir()

    def write_note():
        with atomic_open(root / "notes.txt") as handle:
            handle.write("new notes, half written")
            handle.flush()
            _stop_here()

    def write_model():
        with atomic_folder(root / "sub" / "model") as tmp:
            _fill(tmp, "v2, half written")
            _stop_here()

    def is_swap_in(name):  # the second rename of a folder swap: the new version moves into place
        return lambda event, args: (event == "os.rename" and f".{name}.selfrank.tmp-" in str(args[0]))

    def is_old_removal(name):  # the swap is complete; the old version is about to be deleted
        return lambda event, args: (event == "shutil.rmtree" and f".{name}.selfrank.old-" in str(args[0]))

    _killed_at(write_note)
    _killed_at(write_model)
    _killed_at(lambda: _write_folder(root / "checkpoint", "v2"), is_swap_in("checkpoint"))
    _killed_at(lambda: _write_folder(root / "sub" / "final", "v2"), is_old_removal("final"))

    assert not (root / "checkpoint").exists()  # the cut swap: neither version in place
    left = sorted(p.name.split(".selfrank")[0] for p in _marked(root) if p not in own + own_folders)
    assert left == [".checkpoint", ".checkpoint", ".final", ".model", ".notes.txt"]  # what the kills left

    removed = remove_stale_temporaries(root)

    assert len(removed) == 5
    assert (root / "notes.txt").read_text() == "old notes"
    assert (root / "sub" / "model" / "weights.txt").read_text() == "v1"
    assert (root / "checkpoint" / "weights.txt").read_text() == "v1"  # the old version is back
    assert (root / "sub" / "final" / "weights.txt").read_text() == "v2"  # that swap had completed
    assert _marked(root) == sorted(p for p in own + own_folders if "selfrank" in p.name)
    assert all(p.read_text() == "mine" for p in own) and all(p.is_dir() for p in own_folders)
    assert remove_stale_temporaries(root) == []
    assert remove_stale_temporaries(tmp_path / "no such folder") == []


def test_completed_and_failed_writes_leave_nothing(tmp_path):
    write_text(tmp_path / "a.json", "{}")
    _write_folder(tmp_path / "model", "v1")
    _write_folder(tmp_path / "model", "v2")
    try:
        with atomic_folder(tmp_path / "model") as tmp:
            _fill(tmp, "v3")
            raise RuntimeError("failed mid-write")
    except RuntimeError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "model"]
    assert (tmp_path / "model" / "weights.txt").read_text() == "v2"
    assert remove_stale_temporaries(tmp_path) == []
