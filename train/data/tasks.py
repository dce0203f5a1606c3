"""Tasks as prompt -> answer examples: dialogue (context turns -> next turn) and QA (context + question -> answer).

Sources are local ``.jsonl`` / ``.json`` files (validated row by row; a bad row is a ``UserError`` naming
``file:line``) or a hub dataset name (``daily_dialog``, ``squad_v2``, ``cornell_movie_dialog``) loaded with
``datasets``. Prompts use the paper's markers: dialogue ``"<c> turn1 turn2 <a>"``, QA
``"<c> context <q> question <a>"``; each example keeps its prompt's parts, and
:func:`load_prompted_task` re-renders them for a chat policy (``train/data/prompts.py``).

Splits never leak. A split that is not given (or names the same source as ``train``) is carved out of
the training source by *group*: a SQuAD article title, or a dialogue (keyed by its first turn), so no
context is shared across train/validation/test. Caps (``max_train`` ...) keep a fixed pseudo-random
subset chosen by a hash of each example id, so they are deterministic and independent of file order.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

from selfrank.errors import UserError
from selfrank.jsonl import read_jsonl

from selfrank.train.config import PromptFormat, TaskConfig
from selfrank.train.data.synthetic import make_task
from selfrank.train.data.examples import SPLITS, Example, TaskData
from selfrank.train.data.prompts import dialogue_parts, format_task, markers_prompt, qa_parts

log = logging.getLogger(__name__)

HUB_DATASETS = ("daily_dialog", "squad_v2", "cornell_movie_dialog")
# Share of the groups carved out of the training source for each missing split.
CARVE_FRACTION = 0.1


# ----------------------------------------------------------------------------------------------- row checks

def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line is not None else source


def _text(row: dict, key: str, where: str, *, allow_empty: bool = False) -> str:
    if key not in row:
        raise UserError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: field '{key}' is empty")
    return value


def _text_list(row: dict, key: str, where: str, *, allow_empty_list: bool = False) -> list[str]:
    if key not in row:
        raise UserError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: field '{key}' must be a list of strings")
    if not value and not allow_empty_list:
        raise UserError(f"{where}: field '{key}' is an empty list")
    if any(not v.strip() for v in value):
        raise UserError(f"{where}: field '{key}' has an empty string")
    return value


def dialogue_example(row: dict, where: str, ident: str, fmt: PromptFormat) -> Example:
    turns = [t.strip() for t in _text_list(row, "context", where)]
    response = _text(row, "response", where).strip()
    parts = dialogue_parts(turns)
    return Example(id=ident, prompt=markers_prompt(parts, fmt), target=response, references=[response],
                   meta={"group": "dialogue:" + turns[0], "source": where}, parts=parts)


def qa_example(row: dict, where: str, fmt: PromptFormat, unanswerable: str) -> Example:
    ident = _text(row, "id", where)
    context = _text(row, "context", where)
    question = _text(row, "question", where)
    title = row.get("title", "")
    if not isinstance(title, str):
        raise UserError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
    answers = _text_list(row, "answers", where, allow_empty_list=True)
    impossible = row.get("is_impossible", not answers)
    if not isinstance(impossible, bool):
        raise UserError(f"{where}: field 'is_impossible' must be true or false")
    if not impossible and not answers:
        raise UserError(f"{where}: answerable question with no answers (set is_impossible or give answers)")
    references = [unanswerable] if impossible else list(dict.fromkeys(a.strip() for a in answers))
    group = "title:" + title if title.strip() else "context:" + context.strip()
    parts = qa_parts(context, question)
    return Example(id=ident, prompt=markers_prompt(parts, fmt), target=references[0],
                   references=references, meta={"group": group, "impossible": impossible, "source": where},
                   parts=parts)


# ----------------------------------------------------------------------------------------------- local files

def _local_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for every row of a local .jsonl / .json file."""
    if path.suffix == ".jsonl":
        for number, row in read_jsonl(path):
            yield _where(str(path), number), row
        return
    if path.suffix != ".json":
        raise UserError(f"{path}: expected a .jsonl or .json file")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
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
        yield where, row


def _official_squad_rows(path: Path, articles: list) -> Iterator[tuple[str, dict]]:
    """Flatten the official SQuAD JSON (articles -> paragraphs -> qas) into the flat row schema."""
    for a, article in enumerate(articles):
        try:
            for p, paragraph in enumerate(article["paragraphs"]):
                for q, qa in enumerate(paragraph["qas"]):
                    yield f"{path}:data[{a}].paragraphs[{p}].qas[{q}]", {
                        "id": qa["id"], "title": article.get("title", ""), "context": paragraph["context"],
                        "question": qa["question"], "answers": [x["text"] for x in qa.get("answers", [])],
                        "is_impossible": bool(qa.get("is_impossible", False))}
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}:data[{a}]: not in SQuAD format (missing {exc})") from None


def _local_examples(kind: str, path: Path, cfg: TaskConfig) -> list[Example]:
    examples = []
    for where, row in _local_rows(path):
        if kind == "dialogue":
            examples.append(dialogue_example(row, where, f"{path.stem}:{where.rsplit(':', 1)[1]}", cfg.prompt))
        else:
            examples.append(qa_example(row, where, cfg.prompt, cfg.unanswerable_target))
    _check_unique_ids(examples, str(path))
    return examples


def _check_unique_ids(examples: list[Example], source: str) -> None:
    seen = {}
    for ex in examples:
        if ex.id in seen:
            raise UserError(f"{ex.meta.get('source', source)}: duplicate id {ex.id!r} (first at {seen[ex.id]})")
        seen[ex.id] = ex.meta.get("source", source)


# ----------------------------------------------------------------------------------------------- hub datasets

def _hub_examples(kind: str, name: str, split: str, cfg: TaskConfig) -> list[Example] | None:
    """Examples of one split of a hub dataset, or None when the dataset has no such split."""
    try:
        import datasets

        loaded = datasets.load_dataset(name, cfg.hub_config)
    except Exception as exc:  # the hub raises many types (connection, missing config, offline mode)
        raise UserError(f"task: cannot load hub dataset {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        "offline, give local .jsonl files instead") from None
    if split not in loaded:
        return None
    rows = loaded[split]
    base = name.split("/")[-1]
    examples: list[Example] = []
    for index, row in enumerate(rows):
        where = f"{name}[{split}][{index}]"
        if base == "daily_dialog":
            examples.extend(_expand_dialogue(row.get("dialog") or [], f"{split}:{index}", where, cfg.prompt))
        elif base == "cornell_movie_dialog":
            turns = (row.get("utterance") or {}).get("text") or []
            examples.extend(_expand_dialogue(turns, f"{split}:{index}", where, cfg.prompt))
        elif base == "squad_v2" or kind == "qa":
            answers = row["answers"]["text"] if isinstance(row.get("answers"), dict) else row.get("answers", [])
            flat = {"id": row["id"], "title": row.get("title", ""), "context": row["context"],
                    "question": row["question"], "answers": list(answers), "is_impossible": not answers}
            examples.append(qa_example(flat, where, cfg.prompt, cfg.unanswerable_target))
        else:
            examples.append(dialogue_example(row, where, f"{split}:{index}", cfg.prompt))
    return examples


def _expand_dialogue(turns: Iterable[str], ident: str, where: str, fmt: PromptFormat) -> list[Example]:
    """One example per turn after the first: all earlier turns -> this turn (the shared data's rule)."""
    turns = [t.strip() for t in turns if isinstance(t, str) and t.strip()]
    return [dialogue_example({"context": turns[:i], "response": turns[i]}, where, f"{ident}:{i}", fmt)
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

def _is_local(source: str) -> bool:
    return source.endswith((".json", ".jsonl")) or Path(source).exists()


def _load_source(kind: str, source: str, split: str, cfg: TaskConfig) -> list[Example] | None:
    if _is_local(source):
        return _local_examples(kind, Path(source).expanduser(), cfg)
    base = source.split("/")[-1]
    if base not in HUB_DATASETS:
        log.warning("hub dataset %r is not one of %s; mapping its rows as the local schema", source, HUB_DATASETS)
    return _hub_examples(kind, source, split, cfg)


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
    train = _load_source(cfg.kind, cfg.train, "train", cfg)
    if train is None:
        raise UserError(f"task.train: {cfg.train!r} has no 'train' split")
    loaded: dict[str, list[Example]] = {}
    missing = []
    for name in ("validation", "test"):
        source = getattr(cfg, name)
        if source is None and not _is_local(cfg.train):
            source = cfg.train  # a hub dataset's own split of that name, when it has one
            examples = _load_source(cfg.kind, source, name, cfg)
        elif source is None or source == cfg.train:
            examples = None
        else:
            examples = _load_source(cfg.kind, source, name, cfg)
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
