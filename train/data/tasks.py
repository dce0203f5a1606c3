"""Tasks as prompt -> answer examples: dialogue (context turns -> next turn) and QA (context + question -> answer).

Sources are local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` files or a hub dataset name
(``train/data/sources.py``); each row becomes an example through the task's column mapping
(``train/data/rows.py``), and a bad row is a ``UserError`` naming it (``file:line``, ``file:row N``).
Prompts use the paper's markers: dialogue ``"<c> turn1 turn2 <a>"``, QA ``"<c> context <q> question <a>"``;
each example keeps its prompt's parts, and
:func:`load_prompted_task` re-renders them for a chat policy (``train/data/prompts.py``).

Splits never leak. A split that is not given (or names the same source as ``train``) is carved out of
the training source by *group*: a SQuAD article title, or a dialogue (keyed by its first turn), so no
context is shared across train/validation/test. Caps (``max_train`` ...) keep a fixed pseudo-random
subset chosen by a hash of each example id, so they are deterministic and independent of file order.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable

from selfrank.errors import UserError

from selfrank.train.config import TaskConfig
from selfrank.train.data.synthetic import make_task
from selfrank.train.data.examples import SPLITS, Example, TaskData
from selfrank.train.data.prompts import format_task
from selfrank.train.data.rows import dialogue_example, row_example
from selfrank.train.data.sources import HubCache, hub_rows, is_local, local_rows

log = logging.getLogger(__name__)

# Share of the groups carved out of the training source for each missing split.
CARVE_FRACTION = 0.1


# ----------------------------------------------------------------------------------------------- sources

def _source_examples(rows, cfg: TaskConfig, id_prefix: str) -> list[Example]:
    """A dialogue example's id is ``id_prefix`` + its row's key (a QA row carries its own id)."""
    return [row_example(r.row, r.where, id_prefix + r.key, cfg) for r in rows]


def _local_examples(path: Path, cfg: TaskConfig) -> list[Example]:
    examples = _source_examples(local_rows(path), cfg, f"{path.stem}:")
    _check_unique_ids(examples, str(path))
    return examples


def _check_unique_ids(examples: list[Example], source: str) -> None:
    seen = {}
    for ex in examples:
        if ex.id in seen:
            raise UserError(f"{ex.meta.get('source', source)}: duplicate id {ex.id!r} (first at {seen[ex.id]})")
        seen[ex.id] = ex.meta.get("source", source)


def _hub_examples(name: str, split: str, cfg: TaskConfig, hub: HubCache) -> list[Example] | None:
    """Examples of one split of a hub dataset, or None when the dataset has no such split. DailyDialog's
    and Cornell's whole dialogues (with the default columns) give one example per turn after the first."""
    rows = hub.split(name, split)
    if rows is None:
        return None
    base = name.split("/")[-1]
    if cfg.kind == "dialogue" and not cfg.columns.given() and base in WHOLE_DIALOGUES:
        examples: list[Example] = []
        for r in hub_rows(name, split, rows):
            turns = WHOLE_DIALOGUES[base](r.row)
            examples.extend(_expand_dialogue(turns, r.key, r.where, cfg))
        return examples
    return _source_examples(hub_rows(name, split, rows), cfg, "")


# Hub dialogue datasets whose rows are whole dialogues: their turns.
WHOLE_DIALOGUES = {
    "daily_dialog": lambda row: row.get("dialog") or [],
    "cornell_movie_dialog": lambda row: (row.get("utterance") or {}).get("text") or [],
}


def _expand_dialogue(turns: Iterable[str], ident: str, where: str, cfg: TaskConfig) -> list[Example]:
    """One example per turn after the first: all earlier turns -> this turn (the shared data's rule)."""
    turns = [t.strip() for t in turns if isinstance(t, str) and t.strip()]
    return [dialogue_example({"context": turns[:i], "response": turns[i]}, where, f"{ident}:{i}", cfg)
            for i in range(1, len(turns))]


# ----------------------------------------------------------------------------------------------- splitting

def _hash(text: str) -> int:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16)


def carve(examples: list[Example], names: list[str]) -> dict[str, list[Example]]:
    """Split ``examples`` by group into ``train`` plus each of ``names`` (``CARVE_FRACTION`` of groups each).

    Groups are ordered by a hash of their key, so the split is deterministic and no group straddles two
    splits. Each carved split gets at least one group while the training split keeps at least one.
    """
    groups = sorted(dict.fromkeys(ex.meta["group"] for ex in examples), key=_hash)
    if len(groups) < len(names) + 1:
        raise UserError(f"task: only {len(groups)} distinct dialogues/articles; cannot carve "
                        f"{', '.join(names)} out of train without sharing contexts (give those files)")
    take = max(1, round(CARVE_FRACTION * len(groups)))
    take = min(take, (len(groups) - 1) // len(names))
    assignment = {}
    for i, name in enumerate(names):
        for g in groups[i * take:(i + 1) * take]:
            assignment[g] = name
    out = {name: [] for name in ["train", *names]}
    for ex in examples:
        out[assignment.get(ex.meta["group"], "train")].append(ex)
    return out


def cap(examples: list[Example], limit: int | None) -> list[Example]:
    """A fixed pseudo-random subset of ``limit`` examples (by hash of id), in their original order."""
    if limit is None or len(examples) <= limit:
        return examples
    keep = set(sorted(range(len(examples)), key=lambda i: (_hash(examples[i].id), i))[:limit])
    return [ex for i, ex in enumerate(examples) if i in keep]


# ----------------------------------------------------------------------------------------------- entry point

def _load_source(source: str, split: str, cfg: TaskConfig, hub: HubCache) -> list[Example] | None:
    if is_local(source):
        return _local_examples(Path(source).expanduser(), cfg)
    return _hub_examples(source, split, cfg, hub)


def load_task(cfg: TaskConfig) -> TaskData:
    """Load the task's train/validation/test examples (see the module docstring for the rules)."""
    if cfg.kind == "synthetic":
        data = make_task(cfg.synthetic, cfg.prompt)
    else:
        data = _load_files(cfg)
    data = TaskData(cap(data.train, cfg.max_train), cap(data.validation, cfg.max_validation),
                    cap(data.test, cfg.max_test))
    for name in SPLITS:
        if not data.split(name):
            raise UserError(f"task: the {name} split is empty")
    log.info("task %s: %d train, %d validation, %d test examples", cfg.kind, len(data.train),
             len(data.validation), len(data.test))
    return data


def _load_files(cfg: TaskConfig) -> TaskData:
    hub = HubCache(cfg.hub_config, cfg.hub_revision)
    train = _load_source(cfg.train, "train", cfg, hub)
    if train is None:
        raise UserError(f"task.train: {cfg.train!r} has no 'train' split")
    loaded: dict[str, list[Example]] = {}
    missing = []
    for name in ("validation", "test"):
        source = getattr(cfg, name)
        if source is None and not is_local(cfg.train):
            source = cfg.train  # a hub dataset's own split of that name, when it has one
            examples = _load_source(source, name, cfg, hub)
        elif source is None or source == cfg.train:
            examples = None
        else:
            examples = _load_source(source, name, cfg, hub)
        if examples is None:
            missing.append(name)
        else:
            loaded[name] = examples
    if missing:
        parts = carve(train, missing)
        train = parts["train"]
        loaded.update({name: parts[name] for name in missing})
    return TaskData(train, loaded["validation"], loaded["test"])


def load_prompted_task(config, tokenizer) -> TaskData:
    """The run's task with its prompts in the style of the policy whose tokenizer is ``tokenizer`` (a
    tokenizer, or a model folder to read it from): what every stage that reads prompts uses."""
    if isinstance(tokenizer, (str, Path)):
        from selfrank.train.models.causal_lm import load_tokenizer

        tokenizer = load_tokenizer(Path(tokenizer), config.model)
    return format_task(load_task(config.task), tokenizer, config)
