"""One data row -> one example (or, for a prompts-only source, one prompt), through the task's column
mapping (``task.columns``, see ``train.config.TaskColumns``). Every check names the row (``where``:
``file:line`` for JSON lines, ``file:row N`` for Parquet and CSV) in a one-line ``UserError``.

Row schemas (default column names; ``task.columns`` renames any of them):

* qa: ``id``, ``context`` (the passage), ``question``, ``answers`` (a list of strings, or SQuAD's
  ``{"text": [...], "answer_start": [...]}``), optional ``title`` (the leakage group) and
  ``is_impossible`` (default: no answers);
* dialogue: ``context`` (the earlier turns, oldest first) and ``response``; or ``messages`` (chat
  format, a list of ``{"role", "content"}``; the last message is the assistant's answer, the rest the
  context, an optional system message first); or ``prompt`` (one string) and ``response``. Unless
  ``task.columns`` names one of turns/messages/prompt, a row gives the first of those it has.

CSV cells are text: a list (turns, answers, messages) is written as JSON text, a boolean as true/false.
"""
from __future__ import annotations

import json

from selfrank.errors import UserError

from selfrank.train.config import TaskColumns, TaskConfig
from selfrank.train.data.examples import Example
from selfrank.train.data.prompts import PromptParts, dialogue_parts, markers_prompt, qa_parts

ROLES = ("system", "user", "assistant")


class TextRow(dict):
    """A row whose cells are all text (read from CSV): lists and booleans in it are decoded on use."""


# ----------------------------------------------------------------------------------------------- cells

def _missing(where: str, column: str) -> UserError:
    return UserError(f"{where}: missing field '{column}'")


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def text_cell(row: dict, column: str, where: str, *, allow_empty: bool = False) -> str:
    if column not in row:
        raise _missing(where, column)
    value = row[column]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{column}' must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: field '{column}' is empty")
    return value


def _decoded(row: dict, column: str, where: str):
    """The cell, with a text row's JSON text decoded (a list or an object)."""
    value = row[column]
    if isinstance(row, TextRow) and isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            raise UserError(f"{where}: field '{column}' must be a JSON list in a CSV cell, got {value[:40]!r}") from None
    return value


def text_list_cell(row: dict, column: str, where: str, *, allow_empty_list: bool = False) -> list[str]:
    if column not in row:
        raise _missing(where, column)
    value = _decoded(row, column, where)
    if isinstance(value, dict) and "text" in value:  # SQuAD's answers: {"text": [...], "answer_start": [...]}
        value = value["text"]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: field '{column}' must be a list of strings")
    if not value and not allow_empty_list:
        raise UserError(f"{where}: field '{column}' is an empty list")
    if any(not v.strip() for v in value):
        raise UserError(f"{where}: field '{column}' has an empty string")
    return list(value)


def bool_cell(row: dict, column: str, where: str, default: bool) -> bool:
    value = row.get(column, default)
    if isinstance(row, TextRow) and isinstance(value, str):
        value = {"true": True, "false": False, "": default}.get(value.strip().lower(), value)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"{where}: field '{column}' must be true or false")
    return value


def messages_cell(row: dict, column: str, where: str) -> list[dict]:
    """A chat conversation: a non-empty list of {"role", "content"}, a system message only first."""
    if column not in row:
        raise _missing(where, column)
    value = _decoded(row, column, where)
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{column}' must be a non-empty list of {{\"role\", \"content\"}} messages")
    out = []
    for i, message in enumerate(value):
        at = f"{where}: {column}[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{at} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(f"{at}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i:
            raise UserError(f"{at}: a system message may only come first")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{at}: content must be a non-empty string")
        out.append({"role": role, "content": content.strip()})
    return out


# ----------------------------------------------------------------------------------------------- dialogue

def _has(row: dict, column: str) -> bool:
    """Whether a row gives ``column``: a file with rows of several forms (Parquet, CSV) holds every column
    in every row, null (Parquet) or an empty cell (CSV) where a row has none."""
    value = row.get(column)
    return value is not None and not (isinstance(row, TextRow) and value == "")


def _context_column(row: dict, columns: TaskColumns) -> str:
    """Which of turns / messages / prompt holds a dialogue row's context: the one ``columns`` names, else
    the first default column the row has (turns when it has none, for the error)."""
    for key in ("turns", "messages", "prompt"):
        if getattr(columns, key) is not None:
            return key
    for key in ("turns", "messages", "prompt"):
        if _has(row, columns.name(key)):
            return key
    return "turns"


def _messages_parts(messages: list[dict]) -> PromptParts:
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    return PromptParts("dialogue", tuple(m["content"] for m in rest), roles=tuple(m["role"] for m in rest),
                       system=system)


def dialogue_parts_and_response(row: dict, where: str, columns: TaskColumns, *,
                                with_response: bool = True) -> tuple[PromptParts, str | None]:
    """A dialogue row's prompt parts and (``with_response``) its response."""
    key = _context_column(row, columns)
    column = columns.name(key)
    if key == "messages":
        messages = messages_cell(row, column, where)
        if with_response:
            if messages[-1]["role"] != "assistant":
                raise UserError(f"{where}: field '{column}' must end with the assistant's message (the response)")
            messages, response = messages[:-1], messages[-1]["content"]
        else:
            if messages[-1]["role"] != "user":
                raise UserError(f"{where}: field '{column}' must end with a user message (a prompt has no answer)")
            response = None
        if not any(m["role"] != "system" for m in messages):
            raise UserError(f"{where}: field '{column}' has no message before the response")
        return _messages_parts(messages), response
    if key == "prompt":
        turns = [text_cell(row, column, where).strip()]
    else:
        turns = [t.strip() for t in text_list_cell(row, column, where)]
    response = text_cell(row, columns.name("response"), where).strip() if with_response else None
    return dialogue_parts(turns), response


def dialogue_example(row: dict, where: str, ident: str, cfg: TaskConfig) -> Example:
    parts, response = dialogue_parts_and_response(row, where, cfg.columns)
    return Example(id=ident, prompt=markers_prompt(parts, cfg.prompt), target=response, references=[response],
                   meta={"group": "dialogue:" + parts.context[0], "source": where}, parts=parts)


# ----------------------------------------------------------------------------------------------- qa

def qa_example(row: dict, where: str, cfg: TaskConfig) -> Example:
    col = cfg.columns.name
    ident = text_cell(row, col("id"), where)
    context = text_cell(row, col("context"), where)
    question = text_cell(row, col("question"), where)
    title = row.get(col("title"), "")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise UserError(f"{where}: field '{col('title')}' must be a string, got {_type_name(title)}")
    answers = text_list_cell(row, col("answers"), where, allow_empty_list=True)
    impossible = bool_cell(row, col("is_impossible"), where, default=not answers)
    if not impossible and not answers:
        raise UserError(f"{where}: answerable question with no answers (set {col('is_impossible')} or give answers)")
    references = [cfg.unanswerable_target] if impossible else list(dict.fromkeys(a.strip() for a in answers))
    group = "title:" + title if title.strip() else "context:" + context.strip()
    parts = qa_parts(context, question)
    return Example(id=ident, prompt=markers_prompt(parts, cfg.prompt), target=references[0],
                   references=references, meta={"group": group, "impossible": impossible, "source": where},
                   parts=parts)


def row_example(row: dict, where: str, ident: str, cfg: TaskConfig) -> Example:
    """The example of one row of a ``cfg.kind`` task (``ident``: a dialogue example's id; QA rows carry theirs)."""
    if cfg.kind == "dialogue":
        return dialogue_example(row, where, ident, cfg)
    return qa_example(row, where, cfg)


# ----------------------------------------------------------------------------------------------- prompts only

def prompt_row_parts(row: dict, where: str, cfg: TaskConfig) -> PromptParts:
    """The prompt of a prompts-only row: ``prompt`` (one string), ``messages`` ending with a user message,
    or the task's own context columns (a dialogue's turns; a QA row's context and question)."""
    columns = cfg.columns
    prompt_col, messages_col = columns.name("prompt"), columns.name("messages")
    if cfg.kind == "qa" and not _has(row, prompt_col) and not _has(row, messages_col):
        return qa_parts(text_cell(row, columns.name("context"), where), text_cell(row, columns.name("question"), where))
    if cfg.kind != "dialogue":  # qa rows with a prompt or messages, read as a dialogue's
        columns = TaskColumns(prompt=columns.prompt, messages=columns.messages)
    if _context_column(row, columns) == "turns" and not _has(row, columns.name("turns")):
        raise UserError(f"{where}: a prompt row needs a '{prompt_col}' (text) or '{messages_col}' (chat) field"
                        + (f" or the task's '{columns.name('turns')}' turns" if cfg.kind == "dialogue" else ""))
    parts, _ = dialogue_parts_and_response(row, where, columns, with_response=False)
    return parts
