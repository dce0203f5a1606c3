"""Where a task's rows come from: local files (by extension) or a hub dataset, read the `datasets` way.

* ``.jsonl`` / ``.json``: read here, row by row, so that a bad row is named by its line (``file:line``;
  ``file:[i]`` in a JSON list) and no value is cast: these are the rows `datasets`' "json" builder
  reads, without its one-schema-per-file inference (which fails a whole file on one odd row, or casts
  it). The official SQuAD JSON (``{"data": [articles]}``) is flattened to the QA row schema.
* ``.parquet`` / ``.csv``: ``datasets.load_dataset("parquet" | "csv", data_files=...)``; rows are named
  ``file:row N`` (N from 1, the CSV header not counted). CSV cells are read as text (train/data/rows.py
  decodes JSON lists and true/false where a list or a boolean is expected).
* anything else: a hub dataset (or a local folder laid out as one), ``datasets.load_dataset(name,
  hub_config, revision=hub_revision)``; rows are named ``name[split][i]``. A dataset script is never run (the
  installed `datasets` refuses them and ``trust_remote_code`` is never set): a script-based dataset is
  read from the hub's Parquet conversion, ``hub_revision: refs/convert/parquet``. With
  ``HF_DATASETS_OFFLINE=1`` local files still load; a hub name that is not cached fails in one line.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from selfrank.errors import UserError
from selfrank.jsonl import read_jsonl

from selfrank.train.data.rows import TextRow

log = logging.getLogger(__name__)

# Local file extension -> the `datasets` builder that reads it.
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SCRIPT_REFUSED = "Dataset scripts are no longer supported"
PARQUET_REVISION = "refs/convert/parquet"


@dataclass
class SourceRow:
    where: str  # how errors name the row
    key: str  # the row's position within its source (a dialogue example's id is "<stem>:<key>")
    row: dict


def is_local(source: str) -> bool:
    """A local file (a local folder is read as a dataset repository, like a hub name)."""
    return source.endswith(tuple(LOCAL_FORMATS)) or Path(source).expanduser().is_file()


# ----------------------------------------------------------------------------------------------- local files

def local_rows(path: Path) -> Iterator[SourceRow]:
    """Every row of a local .jsonl / .json / .parquet / .csv file."""
    fmt = LOCAL_FORMATS.get(path.suffix)
    if fmt is None:
        raise UserError(f"{path}: expected a .jsonl, .json, .parquet or .csv file")
    if path.suffix == ".jsonl":
        for number, row in read_jsonl(path):
            yield SourceRow(f"{path}:{number}", str(number), row)
        return
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".json":
        yield from _json_rows(path)
    else:
        yield from _datasets_rows(path, fmt)


def _json_rows(path: Path) -> Iterator[SourceRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        yield from _official_squad_rows(path, data["data"])
        return
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty JSON list of rows (or SQuAD's {{'data': [...]}})")
    for index, row in enumerate(data):
        where = f"{path}:[{index}]"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield SourceRow(where, f"[{index}]", row)


def _official_squad_rows(path: Path, articles: list) -> Iterator[SourceRow]:
    """Flatten the official SQuAD JSON (articles -> paragraphs -> qas) into the flat row schema."""
    for a, article in enumerate(articles):
        try:
            for p, paragraph in enumerate(article["paragraphs"]):
                for q, qa in enumerate(paragraph["qas"]):
                    where = f"{path}:data[{a}].paragraphs[{p}].qas[{q}]"
                    yield SourceRow(where, where.rsplit(":", 1)[1], {
                        "id": qa["id"], "title": article.get("title", ""), "context": paragraph["context"],
                        "question": qa["question"], "answers": [x["text"] for x in qa.get("answers", [])],
                        "is_impossible": bool(qa.get("is_impossible", False))})
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}:data[{a}]: not in SQuAD format (missing {exc})") from None


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle), None)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None
    if not header:
        raise UserError(f"{path}: empty CSV file (the first line must name the columns)")
    if len(set(header)) != len(header):
        raise UserError(f"{path}:1: duplicate column names in the CSV header")
    return header


def _datasets_rows(path: Path, fmt: str) -> Iterator[SourceRow]:
    import datasets

    kwargs = {}
    if fmt == "csv":
        # Every cell as text, an empty cell as "" (not a missing value): the row checks decide what it means.
        kwargs = dict(features=datasets.Features({name: datasets.Value("string") for name in _csv_header(path)}),
                      keep_default_na=False)
    try:
        loaded = datasets.load_dataset(fmt, data_files=str(path.resolve()), split="train", **kwargs)
    except Exception as exc:  # pyarrow / pandas raise many types for a malformed file
        raise UserError(f"{path}: cannot read as {fmt} ({type(exc).__name__}: {_first_line(exc)})") from None
    wrap = TextRow if fmt == "csv" else dict
    for index, row in enumerate(loaded, start=1):
        yield SourceRow(f"{path}:row {index}", str(index), wrap(row))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else "no details"


# ----------------------------------------------------------------------------------------------- hub datasets

class HubCache:
    """Each hub dataset loaded once per task load (its train, validation and test splits are read in turn)."""

    def __init__(self, hub_config: str | None, hub_revision: str | None):
        self.hub_config = hub_config
        self.hub_revision = hub_revision
        self._loaded: dict[str, object] = {}

    def split(self, name: str, split: str):
        """The split ``split`` of hub dataset ``name`` (a ``datasets.Dataset``), or None when it has none."""
        if name not in self._loaded:
            self._loaded[name] = load_hub(name, self.hub_config, self.hub_revision)
        loaded = self._loaded[name]
        return loaded[split] if split in loaded else None


def load_hub(name: str, hub_config: str | None, hub_revision: str | None):
    """Every split of a hub dataset (a ``datasets.DatasetDict``); a one-line ``UserError`` when it cannot be."""
    try:
        import datasets

        return datasets.load_dataset(name, hub_config, revision=hub_revision)
    except Exception as exc:  # the hub raises many types (connection, missing config, offline mode)
        if SCRIPT_REFUSED in str(exc):
            raise UserError(f"task: {name!r} is a script-based hub dataset and scripts are never run; read its "
                            f"Parquet conversion instead: task.hub_revision: {PARQUET_REVISION}") from None
        raise UserError(f"task: cannot load hub dataset {name!r} ({type(exc).__name__}: {_first_line(exc)}); "
                        "offline, give local .jsonl/.parquet/.csv files instead") from None


def hub_rows(name: str, split: str, rows) -> Iterator[SourceRow]:
    for index, row in enumerate(rows):
        yield SourceRow(f"{name}[{split}][{index}]", f"{split}:{index}", row)
