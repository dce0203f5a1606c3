"""Preference data written by the sample stage and read by the reward stage: ``pairs.jsonl``
(winner/loser pairs, with the perturbed loser of the noise variant) and ``ranked.jsonl`` (each group's
answers in TextRank order); the held-out split is by PROMPT, so no prompt is on both sides."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from selfrank.errors import UserError
from selfrank.jsonl import read_jsonl
from selfrank.ranking.engine import RankedGroup, stable_seed

LOSSES = ("pairwise", "listwise")


@dataclass(frozen=True)
class PreferencePair:
    group_id: str
    prompt: str
    winner: str
    loser: str
    loser_noised: str | None = None
    noise_kind: str | None = None

    def loser_text(self, use_noise: bool) -> str:
        """The loser to train on: its perturbed version under ``use_noise`` when one exists."""
        return self.loser_noised if use_noise and self.loser_noised is not None else self.loser


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Read ``pairs.jsonl``; every malformed row is a ``UserError`` naming ``file:line``."""
    pairs: list[PreferencePair] = []
    prompt_of: dict[str, str] = {}
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        for key in ("group_id", "prompt", "winner", "loser"):
            if key not in row:
                raise UserError(f"{where}: missing key '{key}'")
        for key in ("prompt", "winner", "loser"):
            if not isinstance(row[key], str):
                raise UserError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
        noised = row.get("loser_noised")
        if noised is not None and not isinstance(noised, str):
            raise UserError(f"{where}: 'loser_noised' must be a string or null, got {type(noised).__name__}")
        group_id = str(row["group_id"])
        if prompt_of.setdefault(group_id, row["prompt"]) != row["prompt"]:
            raise UserError(f"{where}: group_id {group_id!r} appears with two different prompts")
        pairs.append(PreferencePair(group_id, row["prompt"], row["winner"], row["loser"], noised,
                                    row.get("noise_kind")))
    return pairs


def load_ranked(path: str | Path) -> list[RankedGroup]:
    """Read ``ranked.jsonl`` (``RankedGroup.to_json`` rows) with ``file:line`` errors."""
    groups: list[RankedGroup] = []
    for number, row in read_jsonl(path):
        try:
            group = RankedGroup.from_json(row)
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{path}:{number}: {exc}") from None
        n = len(group.responses)
        if any(not 0 <= i < n for i in group.representatives):
            raise UserError(f"{path}:{number}: 'representatives' index out of range for {n} responses")
        groups.append(group)
    return groups


def ranked_lists(groups: Iterable[RankedGroup]) -> list[tuple[str, list[str]]]:
    """``(prompt, texts best first)`` per group: the cluster representatives in TextRank order
    (near-duplicates removed, as for the pairs). Lists of fewer than two texts teach nothing."""
    out = []
    for group in groups:
        texts = [group.responses[i] for i in group.representatives]
        if len(texts) >= 2:
            out.append((group.prompt, texts))
    return out


def heldout_prompts(prompts: Iterable[str], fraction: float, seed: int) -> set[str]:
    """The prompts held out: ``round(fraction * n)`` of the distinct prompts (at least one and at most
    ``n - 1`` when ``fraction > 0`` and ``n >= 2``), chosen by a stable hash of (seed, prompt).

    Deterministic across processes and independent of file order; every group or pair of a prompt
    goes the same way, so no prompt is on both sides."""
    unique = sorted(set(prompts))
    if fraction <= 0 or len(unique) < 2:
        return set()
    count = min(max(1, round(fraction * len(unique))), len(unique) - 1)
    ranked = sorted(unique, key=lambda p: (stable_seed("reward-heldout", seed, p), p))
    return set(ranked[:count])


def split_pairs(pairs: list[PreferencePair],
                heldout: set[str]) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train, held_out)`` by prompt."""
    train = [p for p in pairs if p.prompt not in heldout]
    held = [p for p in pairs if p.prompt in heldout]
    return train, held


def training_items(pairs: list[PreferencePair], groups: list[RankedGroup], heldout: set[str], loss: str,
                   use_noise: bool) -> list[tuple[str, list[str]]]:
    """What the RM trains on, outside the held-out prompts: ``(prompt, [winner, loser])`` per pair
    (the loser perturbed under ``use_noise`` where a perturbation exists) for ``pairwise``; the whole
    best-first list per group for ``listwise`` (noise decorates pairs only, so it does not apply)."""
    if loss == "pairwise":
        return [(p.prompt, [p.winner, p.loser_text(use_noise)]) for p in pairs if p.prompt not in heldout]
    if loss == "listwise":
        return [(prompt, texts) for prompt, texts in ranked_lists(groups) if prompt not in heldout]
    raise UserError(f"reward loss: must be one of {', '.join(LOSSES)}; got {loss!r}")
