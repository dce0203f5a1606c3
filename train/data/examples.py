"""What every task is made of: ``Example`` (prompt -> answer, with every gold reference and the parts
its prompt is made of) and the three splits. Prompts are formatted in ``train/data/prompts.py``: a
loaded task's prompts are in the paper's marker format (dialogue ``"<c> turn1 turn2 <a>"``, QA
``"<c> context <q> question <a>"``); ``prompts.format_task`` re-renders them for a chat policy."""
from __future__ import annotations

from dataclasses import dataclass, field

from selfrank.train.data.prompts import PromptParts

SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    id: str
    prompt: str
    target: str  # the answer trained on
    references: list[str]  # every gold answer (scoring)
    meta: dict = field(default_factory=dict)  # "group" (leakage key) and source details
    parts: PromptParts | None = None  # what ``prompt`` was rendered from (chat policies re-render it)


@dataclass
class TaskData:
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)
