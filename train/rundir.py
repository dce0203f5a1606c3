"""The run folder: ``<output_dir>/<name>/<stage>/``; a stage is complete when its DONE file exists.

Every stage reads the previous stages' folders and writes only its own, so any stage can be rerun,
resumed, or pointed at another team's artifacts.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from selfrank.atomic import write_json
from selfrank.errors import UserError

DONE = "DONE.json"


@dataclass
class RunDir:
    root: Path

    @classmethod
    def for_config(cls, config) -> "RunDir":
        root = Path(config.output_dir) / config.name
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def stage(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def is_done(self, name: str) -> bool:
        return (self.root / name / DONE).is_file()

    def summary(self, name: str) -> dict:
        path = self.root / name / DONE
        if not path.is_file():
            raise UserError(f"stage '{name}' has not completed in {self.root} (run it first: selfrank {name} CONFIG)")
        return json.loads(path.read_text())

    def mark_done(self, name: str, summary: dict) -> None:
        write_json(self.root / name / DONE, summary)

    def require(self, name: str) -> Path:
        """The folder of a completed earlier stage, or a clear error naming the command to run."""
        self.summary(name)
        return self.root / name

    def reset(self, name: str) -> Path:
        shutil.rmtree(self.root / name, ignore_errors=True)
        return self.stage(name)

    def confined(self, relative: str | Path) -> Path:
        """Resolve a path inside the run folder; refuse anything that escapes it."""
        path = (self.root / relative).resolve()
        if self.root.resolve() not in (path, *path.parents):
            raise UserError(f"output path {relative!s} escapes the run folder {self.root}")
        return path
