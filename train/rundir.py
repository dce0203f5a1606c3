"""The run folder: ``<output_dir>/<name>/<stage>/``; a stage is complete when its DONE file exists.

Every stage reads the previous stages' folders and writes only its own, so any stage can be rerun,
resumed, or pointed at another team's artifacts.

Replacing a finished stage (``--force``) never destroys it before its replacement exists: the new
version is written beside it, in ``<stage>.new/`` (:meth:`RunDir.set_aside`), and swapped in only once
complete (:meth:`RunDir.swap_in`). A failed or interrupted replacement leaves the finished stage as it
was, and ``<stage>.new/`` holds the replacement's checkpoints for ``--resume``. A kill in the middle of
the swap itself is finished by :meth:`RunDir.recover` on the next start.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from selfrank.atomic import write_json
from selfrank.errors import UserError

DONE = "DONE.json"
ASIDE = ".new"  # suffix of a stage's replacement while it is being written
OLD = ".old"  # suffix of a finished stage during the swap that replaces it


@dataclass
class RunDir:
    root: Path
    # Top-level stages being replaced: their names resolve to ``<stage>.new/`` until swapped in.
    aside: set[str] = field(default_factory=set)

    @classmethod
    def for_config(cls, config) -> "RunDir":
        root = Path(config.output_dir) / config.name
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    # ---- where a stage lives ---------------------------------------------------------------------
    def finished_folder(self, top: str) -> Path:
        """Where a stage's finished version lives (``<root>/<stage>``)."""
        return self.root / top

    def aside_folder(self, top: str) -> Path:
        """Where a stage's replacement is written (``<root>/<stage>.new``)."""
        return self.root / (top + ASIDE)

    def path(self, name: str) -> Path:
        """The folder of stage ``name`` (``"ppo"``, or a part such as ``"ppo/str"``): its replacement's
        while it is being replaced, else the finished one's."""
        top, _, rest = name.partition("/")
        base = self.aside_folder(top) if top in self.aside else self.finished_folder(top)
        return base / rest if rest else base

    def stage(self, name: str) -> Path:
        path = self.path(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- completion ------------------------------------------------------------------------------
    def is_done(self, name: str) -> bool:
        return (self.path(name) / DONE).is_file()

    def summary(self, name: str) -> dict:
        path = self.path(name) / DONE
        if not path.is_file():
            raise UserError(f"stage '{name}' has not completed in {self.root} (run it first: selfrank {name} CONFIG)")
        return json.loads(path.read_text())

    def mark_done(self, name: str, summary: dict) -> None:
        """Write the DONE summary. Paths inside it name where the stage ends up, not its replacement folder."""
        top = name.partition("/")[0]
        if top in self.aside:
            summary = _replace_prefix(summary, str(self.aside_folder(top)), str(self.finished_folder(top)))
        write_json(self.path(name) / DONE, summary)

    def require(self, name: str) -> Path:
        """The folder of a completed earlier stage, or a clear error naming the command to run."""
        self.summary(name)
        return self.path(name)

    def reset(self, name: str) -> Path:
        shutil.rmtree(self.path(name), ignore_errors=True)
        return self.stage(name)

    # ---- replacing a finished stage --------------------------------------------------------------
    def set_aside(self, top: str, keep: bool) -> Path:
        """Write stage ``top`` into ``<stage>.new/`` from now on; ``keep``: continue what an interrupted
        replacement left there (its checkpoints), else start it empty."""
        folder = self.aside_folder(top)
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        self.aside.add(top)
        return folder

    def swap_in(self, top: str) -> None:
        """Make the completed replacement of ``top`` the finished stage (renames only; see ``recover``)."""
        new, final, old = self.aside_folder(top), self.finished_folder(top), self.root / (top + OLD)
        if not (new / DONE).is_file():
            raise RuntimeError(f"{new}: the replacement is not complete; nothing swapped")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
        self.aside.discard(top)

    def recover(self, stages) -> None:
        """Finish a swap that a kill interrupted: a complete replacement goes in, else the old stage
        goes back; then no ``<stage>.old`` is left."""
        for top in stages:
            new, final, old = self.aside_folder(top), self.finished_folder(top), self.root / (top + OLD)
            if not old.exists():
                continue
            if not final.exists():
                os.replace(new if (new / DONE).is_file() else old, final)
            shutil.rmtree(old, ignore_errors=True)

    def confined(self, relative: str | Path) -> Path:
        """Resolve a path inside the run folder; refuse anything that escapes it."""
        path = (self.root / relative).resolve()
        if self.root.resolve() not in (path, *path.parents):
            raise UserError(f"output path {relative!s} escapes the run folder {self.root}")
        return path


def _replace_prefix(node, old: str, new: str):
    """``node`` with every string that starts with the folder ``old`` moved to ``new``."""
    if isinstance(node, dict):
        return {key: _replace_prefix(value, old, new) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_prefix(value, old, new) for value in node]
    if isinstance(node, str) and (node == old or node.startswith(old + os.sep)):
        return new + node[len(old):]
    return node


def unfinished_work(folder: Path) -> list[str]:
    """What a rerun without ``--resume`` would throw away in an incomplete stage folder: checkpoints
    (with their step), the sample stage's ranked groups so far, SFT methods already trained."""
    found: list[str] = []
    if not folder.is_dir():
        return found
    for checksums in sorted(folder.rglob("checksums.json")):
        checkpoint = checksums.parent
        if not checkpoint.name.startswith("checkpoint") or checkpoint.name.endswith(ASIDE):
            continue
        try:
            step = json.loads((checkpoint / "state.json").read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            step = None
        where = checkpoint.relative_to(folder.parent)
        found.append(f"a checkpoint at step {step} in {where}" if step is not None else f"a checkpoint in {where}")
    groups = 0
    for progress in folder.glob("progress.*.jsonl"):
        with open(progress, "rb") as handle:
            groups += sum(1 for line in handle if line.strip())
    if groups:
        found.append(f"{groups} ranked groups in {folder.relative_to(folder.parent)}/progress.*.jsonl")
    for summary in sorted(folder.rglob("train_summary.json")):
        if (summary.parent / "model").is_dir():
            found.append(f"a trained model in {summary.parent.relative_to(folder.parent)}/model")
    return found
