"""What every task is made of: ``Example`` (prompt -> answer, with every gold reference), the three
splits, and the prompt formats (the paper's markers: dialogue ``"<c> turn1 turn2 <a>"``, QA
``"<c> context <q> question <a>"``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from selfrank.train.config import PromptFormat

SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    id: str
    prompt: str
    target: str  # the answer trained on
    references: list[str]  # every gold answer (scoring)
    meta: dict = field(default_factory=dict)  # "group" (leakage key) and source details


@dataclass
class TaskData:
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)


# ----------------------------------------------------------------------------------------------- prompts

def dialogue_prompt(turns: list[str], fmt: PromptFormat) -> str:
    kept = turns[-fmt.max_context_turns:] if fmt.max_context_turns else turns
    return f"{fmt.context} {fmt.turn_separator.join(kept)} {fmt.answer}"


def qa_prompt(context: str, question: str, fmt: PromptFormat) -> str:
    return f"{fmt.context} {' '.join(context.split())} {fmt.question} {' '.join(question.split())} {fmt.answer}"


def prompt_markers(fmt: PromptFormat) -> list[str]:
    """The marker strings, to be registered as special tokens."""
    return list(dict.fromkeys([fmt.context, fmt.question, fmt.answer]))
