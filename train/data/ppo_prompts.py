"""The prompts PPO rolls out on: the task's training prompts, or a prompts-only file (``ppo.prompts``).

A prompts-only file (.jsonl / .json / .parquet / .csv) has no answers: each row holds a ``prompt``
(one string, the user's turn), ``messages`` ending with a user message (chat format, an optional
system message first), or the task's own context columns (a dialogue's turns; a QA row's context and
question), with the task's column mapping (train/data/rows.py). Its prompts are rendered like the
task's (markers, or the policy's chat template fitted to the prompt budget: train/data/prompts.py).
"""
from __future__ import annotations

from pathlib import Path

from selfrank.errors import UserError

from selfrank.train.config import ExperimentConfig, TaskConfig
from selfrank.train.data.prompts import ChatPrompter, PromptParts, markers_prompt, prompt_budget, uses_chat
from selfrank.train.data.rows import prompt_row_parts
from selfrank.train.data.sources import LOCAL_FORMATS, local_rows


def read_prompt_file(source: str, task: TaskConfig) -> list[tuple[str, PromptParts]]:
    """``(where, parts)`` of every row of a prompts-only file; a bad row is a one-line ``UserError``."""
    path = Path(source).expanduser()
    if path.suffix not in LOCAL_FORMATS:
        raise UserError(f"ppo.prompts: expected a local .jsonl, .json, .parquet or .csv file, got {source!r}")
    rows = [(r.where, prompt_row_parts(r.row, r.where, task)) for r in local_rows(path)]
    if not rows:
        raise UserError(f"{path}: no prompts (ppo.prompts)")
    return rows


def render_prompts(rows: list[tuple[str, PromptParts]], config: ExperimentConfig, tokenizer) -> list[str]:
    """Each prompt's text in the run's style for this policy ``tokenizer``."""
    if not uses_chat(config, tokenizer):
        return [markers_prompt(parts, config.task.prompt) for _, parts in rows]
    prompter = ChatPrompter(tokenizer, config.task.prompt, prompt_budget(config, tokenizer))
    return [prompter(parts, where) for where, parts in rows]


def ppo_prompts(config: ExperimentConfig, tokenizer) -> list[str]:
    """PPO's prompts for the policy whose tokenizer is ``tokenizer`` (or a model folder to read it from):
    those of ``ppo.prompts`` when set, else the task's training prompts."""
    if isinstance(tokenizer, (str, Path)):
        from selfrank.train.models.causal_lm import load_tokenizer

        tokenizer = load_tokenizer(Path(tokenizer), config.model)
    if config.ppo.prompts is None:
        from selfrank.train.data.tasks import load_prompted_task

        return [ex.prompt for ex in load_prompted_task(config, tokenizer).train]
    return render_prompts(read_prompt_file(config.ppo.prompts, config.task), config, tokenizer)
