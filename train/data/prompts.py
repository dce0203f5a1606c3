"""Prompts: the one place that turns an example's parts (dialogue turns, or passage and question) into
the text a policy reads.

Two styles (``task.prompt.style``, resolved by :func:`resolve_style`):

* ``markers``, the paper's: dialogue ``"<c> turn1 turn2 <a>"``, QA ``"<c> passage <q> question <a>"``. The
  markers become new special tokens of the policy's tokenizer (the tiny models' format);
* ``chat``: the tokenizer's chat template with its generation prompt. Dialogue turns become alternating
  user/assistant messages ending with a user turn (the answer is the assistant's next turn); QA one
  user message: ``"<instruction>\\n\\nContext: <passage>\\n\\nQuestion: <question>"``; an optional system
  message first (``task.prompt.system``).

Chat prompts are fitted to a token budget (:func:`prompt_budget`) once, when a stage formats its task
(:func:`format_task`), so that every stage reads the same prompt: SFT, sampling, the reward model and
PPO. Only the context is cut: the oldest dialogue turns go first, then the left of the oldest kept turn;
a QA passage loses its left part. The cut falls at a word start and is measured by tokenizing the whole
rendered prompt, so the prompt's ids are those of its text, whichever stage tokenizes it. The question,
the last turn's end and the template's structure are never cut.

A markers prompt is followed by one space before the answer; a chat prompt (ending in the template's
newline) by nothing: see ``train.models.causal_lm.answer_separator``.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from selfrank.errors import UserError

from selfrank.train.config import PromptFormat

if TYPE_CHECKING:  # pragma: no cover
    from selfrank.train.config import ExperimentConfig
    from selfrank.train.data.examples import Example, TaskData

log = logging.getLogger(__name__)

_SPACE = re.compile(r"\s")
# A bound above any real context window: larger values of model_max_length mean "not set".
_NO_LIMIT = 10 ** 7


@dataclass(frozen=True)
class PromptParts:
    """What a prompt is made of. ``context``: the dialogue turns (oldest first) or ``(passage,)``.
    A chat-format dialogue (``messages`` rows) keeps each turn's ``roles`` and its own ``system``
    message; without roles, turns alternate user/assistant ending with the user's."""
    kind: str  # "dialogue" or "qa"
    context: tuple[str, ...]
    question: str = ""
    roles: tuple[str, ...] = ()  # one per context turn, or () for alternating turns
    system: str | None = None  # the row's own system message (else task.prompt.system)

    def __post_init__(self):
        if self.kind not in ("dialogue", "qa"):
            raise ValueError(f"PromptParts.kind must be 'dialogue' or 'qa', got {self.kind!r}")
        if self.roles and len(self.roles) != len(self.context):
            raise ValueError("PromptParts.roles: one role per context turn")


def dialogue_parts(turns: Sequence[str]) -> PromptParts:
    return PromptParts("dialogue", tuple(turns))


def qa_parts(passage: str, question: str) -> PromptParts:
    return PromptParts("qa", (passage,), question)


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _kept_turns(turns: Sequence[str], fmt: PromptFormat) -> list[str]:
    return list(turns[-fmt.max_context_turns:] if fmt.max_context_turns else turns)


# ----------------------------------------------------------------------------------------------- markers

def markers_prompt(parts: PromptParts, fmt: PromptFormat) -> str:
    """The paper's marker prompt (the tiny models' format)."""
    if parts.kind == "dialogue":
        return f"{fmt.context} {fmt.turn_separator.join(_kept_turns(parts.context, fmt))} {fmt.answer}"
    return f"{fmt.context} {_collapse(parts.context[0])} {fmt.question} {_collapse(parts.question)} {fmt.answer}"


def prompt_markers(fmt: PromptFormat) -> list[str]:
    """The marker strings, to be registered as special tokens."""
    return list(dict.fromkeys([fmt.context, fmt.question, fmt.answer]))


# ----------------------------------------------------------------------------------------------- styles

def resolve_style(style: str, model_name: str, tokenizer=None) -> str:
    """``markers`` or ``chat`` for a policy: ``auto`` is chat when the model is not the tiny one and its
    tokenizer has a chat template. Without a tokenizer, ``auto`` can only be told for the tiny model."""
    if style == "markers":
        return "markers"
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "chat":
        if tokenizer is not None and not has_template:
            raise UserError(f"task.prompt.style: chat needs a tokenizer with a chat template, and {model_name!r}'s "
                            "has none (use markers)")
        return "chat"
    if style != "auto":
        raise UserError(f"task.prompt.style: unknown style {style!r}")
    return "chat" if model_name != "tiny" and has_template else "markers"


def uses_chat(config: "ExperimentConfig", tokenizer) -> bool:
    """Whether the run's prompts are chat prompts (for this policy tokenizer)."""
    return resolve_style(config.task.prompt.style, config.model.name, tokenizer) == "chat"


def answer_room(config: "ExperimentConfig") -> int:
    """Tokens an answer may take after its prompt: the longest generation of any stage, plus its end."""
    return max(config.sample.max_new_tokens, config.ppo.max_new_tokens, config.eval.max_new_tokens) + 1


def prompt_budget(config: "ExperimentConfig", tokenizer=None) -> int:
    """The most tokens a chat prompt may take: ``task.prompt.max_tokens``, else what leaves room for an
    answer (:func:`answer_room`) in both ``sft.block_size`` and ``reward.max_length``; never more than
    the model's context leaves beside an answer."""
    room = answer_room(config)
    budget = config.task.prompt.max_tokens
    if budget is None:
        budget = min(config.sft.block_size, config.reward.max_length) - room
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < _NO_LIMIT:
        budget = min(budget, limit - room)
    return budget


# Fewer prompt tokens than this cannot hold a chat template, an instruction and a question.
MIN_CHAT_BUDGET = 32


def check_prompt_budget(config: "ExperimentConfig") -> None:
    """Refuse (before anything is written) chat settings that leave too little room for prompts."""
    budget = prompt_budget(config)
    if budget < MIN_CHAT_BUDGET:
        source = ("task.prompt.max_tokens" if config.task.prompt.max_tokens is not None else
                  f"min(sft.block_size, reward.max_length) - (longest max_new_tokens + 1) = "
                  f"min({config.sft.block_size}, {config.reward.max_length}) - {answer_room(config)}")
        raise UserError(f"task.prompt: chat prompts get {budget} tokens ({source}); they need at least "
                        f"{MIN_CHAT_BUDGET}: raise sft.block_size and reward.max_length, or lower max_new_tokens")


# ----------------------------------------------------------------------------------------------- chat

def chat_messages(parts: PromptParts, fmt: PromptFormat, context: Sequence[str]) -> list[dict]:
    """The messages of a chat prompt whose (possibly cut) context is ``context``."""
    system = parts.system if parts.system is not None else fmt.system
    messages = [{"role": "system", "content": system}] if system is not None else []
    if parts.kind == "dialogue" and parts.roles:
        # A cut context keeps its newest turns: their roles are the last ones.
        roles = parts.roles[len(parts.roles) - len(context):]
        return messages + [{"role": role, "content": turn} for role, turn in zip(roles, context)]
    if parts.kind == "dialogue":
        # Counted back from the last turn, which is the user's (the answer is the assistant's next turn).
        last = len(context) - 1
        messages += [{"role": "user" if (last - i) % 2 == 0 else "assistant", "content": turn}
                     for i, turn in enumerate(context)]
        return messages
    body = f"Context: {context[0]}\n\nQuestion: {_collapse(parts.question)}"
    instruction = fmt.qa_instruction.strip()
    messages.append({"role": "user", "content": f"{instruction}\n\n{body}" if instruction else body})
    return messages


def _cut_left(text: str, tokens: int, tokenizer) -> str:
    """``text`` without (at least) its first ``tokens`` tokens, starting at a word start."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if tokens >= len(offsets):
        return ""
    position = offsets[tokens][0]
    if position > 0 and not text[position - 1].isspace():
        found = _SPACE.search(text, position)  # finish the word the cut fell into
        position = found.start() if found else len(text)
    return text[position:].lstrip()


class ChatPrompter:
    """Renders :class:`PromptParts` with ``tokenizer``'s chat template, fitted to ``budget`` tokens."""

    def __init__(self, tokenizer, fmt: PromptFormat, budget: int):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("task.prompt.style: chat needs a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.budget = budget
        self.cut = 0  # prompts whose context was cut to fit

    def render(self, parts: PromptParts, context: Sequence[str]) -> str:
        return self.tokenizer.apply_chat_template(chat_messages(parts, self.fmt, context), tokenize=False,
                                                  add_generation_prompt=True)

    def length(self, text: str) -> int:
        # As the stages tokenize a prompt (train.models.causal_lm.prompt_token_ids).
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def __call__(self, parts: PromptParts, name: str = "prompt") -> str:
        if parts.kind == "dialogue":
            context = [turn.strip() for turn in _kept_turns(parts.context, self.fmt)]
        else:
            context = [_collapse(parts.context[0])]
        text = self.render(parts, context)
        size = self.length(text)
        if size <= self.budget:
            return text
        self.cut += 1
        while parts.kind == "dialogue" and len(context) > 1 and size > self.budget:
            context = context[1:]  # the oldest turn goes first
            text = self.render(parts, context)
            size = self.length(text)
        while size > self.budget:
            if not context[0]:
                what = "its last turn" if parts.kind == "dialogue" else "its question and the template"
                raise UserError(f"{name}: {what} alone take {size} tokens, more than the {self.budget} chat prompts "
                                "get (task.prompt.max_tokens, or sft.block_size / reward.max_length)")
            context = [_cut_left(context[0], size - self.budget, self.tokenizer), *context[1:]]
            text = self.render(parts, context)
            size = self.length(text)
        return text


# ----------------------------------------------------------------------------------------------- tasks

def format_task(data: "TaskData", tokenizer, config: "ExperimentConfig") -> "TaskData":
    """``data`` with every prompt in the run's style for this policy ``tokenizer``: unchanged for
    markers (the prompts were rendered so when the task was loaded), re-rendered from each example's
    parts and fitted to :func:`prompt_budget` for chat."""
    if not uses_chat(config, tokenizer):
        return data
    prompter = ChatPrompter(tokenizer, config.task.prompt, prompt_budget(config, tokenizer))

    def render(examples: list["Example"]) -> list["Example"]:
        out = []
        for ex in examples:
            if ex.parts is None:
                raise ValueError(f"example {ex.id}: no prompt parts to render a chat prompt from")
            out.append(dataclasses.replace(ex, prompt=prompter(ex.parts, f"example {ex.id}")))
        return out

    formatted = dataclasses.replace(data, train=render(data.train), validation=render(data.validation),
                                    test=render(data.test))
    if prompter.cut:
        log.info("chat prompts: %d of %d had their context cut to %d tokens", prompter.cut,
                 len(data.train) + len(data.validation) + len(data.test), prompter.budget)
    return formatted


def tokenizer_texts(data: "TaskData", fmt: PromptFormat) -> list[str]:
    """What a tiny model's tokenizer is trained on: the training prompts and answers (never eval text).
    Chat style: the parts' text and the template's own words instead of marker prompts."""
    if fmt.style != "chat":
        return [f"{ex.prompt} {ex.target}" for ex in data.train]
    texts = []
    for ex in data.train:
        pieces = list(ex.parts.context) + [ex.parts.question] if ex.parts is not None else [ex.prompt]
        texts.append("\n".join([*pieces, ex.target]))
    texts.append(f"system\nuser\nassistant\n{fmt.system or ''}\n{fmt.qa_instruction}\n\nContext: \n\nQuestion: ")
    return texts
