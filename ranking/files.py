"""``selfrank rank``: rank a JSONL file of answer groups into a JSONL file of ranked groups.

Each output line is its input line with the ranking added: every field the ranker does not know
(``gold``, ``meta``, ...) is kept as it was, in place; ``id`` is added (the line number) when absent,
and ``scores``, ``order``, ``clusters``, ``representatives``, ``pairs`` and ``noise`` are written
after the line's own fields (replacing fields of those names, e.g. when a ranked file is ranked
again; ``responses`` too, when the ranking's clean-up trims them). The README documents each field.

The whole input is validated before any model is loaded, so a mistake on line 9,000 costs no
ranking time; the output is written atomically only once every group is ranked, so an error
leaves no file behind and an existing output untouched.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from selfrank.atomic import write_jsonl
from selfrank.ranking.config import RankingConfig
from selfrank.ranking.ranker import check_group
from selfrank.errors import UserError
from selfrank.jsonl import read_jsonl

log = logging.getLogger(__name__)

# Groups per in-process Ranker call: big enough to batch the encoder well, small enough for a
# lively progress bar.
CHUNK_GROUPS = 32


@dataclass
class InputGroup:
    id: str
    prompt: str
    responses: list[str]
    line: int
    row: dict  # the input line as read, every field kept


# What ranking adds to a line (``RankedGroup.to_json()``), besides the input's id, prompt and responses.
RANKING_FIELDS = ("scores", "order", "clusters", "representatives", "pairs", "noise")


def read_groups(path: str | os.PathLike) -> list[InputGroup]:
    """Every line ``{"id"?, "prompt", "responses": [str, ...], ...}``, checked strictly (the ranker's own
    ``check_group``); ids default to the line number and must be unique. Other fields are kept for the
    output. Raises ``UserError`` naming file:line."""
    groups: list[InputGroup] = []
    seen: dict[str, int] = {}
    for line, row in read_jsonl(path):
        where = f"{path}:{line}"
        gid = row.get("id", line)
        if isinstance(gid, bool) or not isinstance(gid, (str, int)):
            raise UserError(f"{where}: 'id' must be a string or an integer, got {type(gid).__name__}")
        gid = str(gid)
        try:
            check_group({**row, "id": gid}, where)
        except (TypeError, ValueError) as exc:
            raise UserError(str(exc)) from None
        if gid in seen:
            raise UserError(f"{where}: duplicate id {gid!r} (first on line {seen[gid]})")
        seen[gid] = line
        groups.append(InputGroup(gid, row["prompt"], row["responses"], line, row))
    return groups


def output_row(group: InputGroup, ranked: dict) -> dict:
    """The input line with the ranking added (see the module docstring)."""
    out = dict(group.row) if "id" in group.row else {"id": None, **group.row}  # a new id goes first
    out["id"] = group.id  # as a string, like every ranked group's id
    out["responses"] = ranked["responses"]
    for key in RANKING_FIELDS:
        out.pop(key, None)  # rewritten after the line's own fields
    out.update({key: ranked[key] for key in RANKING_FIELDS})
    return out


def _rank_in_process(groups: list[InputGroup], config: RankingConfig, bar) -> list[dict]:
    from selfrank.ranking.ranker import Ranker

    ranker = Ranker(config)
    out = []
    for start in range(0, len(groups), CHUNK_GROUPS):
        chunk = groups[start:start + CHUNK_GROUPS]
        ranked = ranker.rank([{"id": g.id, "prompt": g.prompt, "responses": g.responses} for g in chunk])
        out.extend(r.to_json() for r in ranked)
        bar.update(len(chunk))
    log.debug("ranker stats: %s", ranker.stats)
    return out


def _rank_in_pool(groups: list[InputGroup], config: RankingConfig, workers: int, bar) -> list[dict]:
    from selfrank.ranking.pool import RankingPool

    lines = {g.id: g.line for g in groups}
    by_id: dict[str, dict] = {}

    def collect(results) -> None:
        for result in results:
            if not result.ok:
                raise RuntimeError(f"ranking group {result.id!r} (line {lines[result.id]}) failed: {result.error}")
            by_id[result.id] = result.ranked.to_json()
            bar.update(1)

    with RankingPool(config, workers=workers) as pool:
        for group in groups:
            pool.submit(group.id, group.prompt, group.responses)  # blocks while the pool is full
            collect(pool.poll())
        collect(pool.results())
        log.debug("pool stats: %s", pool.stats())
    return [by_id[g.id] for g in groups]


def rank_file(input_path: str | os.PathLike, output_path: str | os.PathLike, config: RankingConfig,
              workers: int = 1) -> int:
    """Rank every group of ``input_path`` into ``output_path`` (same order); returns the group count.

    ``workers == 1`` ranks in this process (no second model load, one encoder call per chunk);
    more workers go through the ``RankingPool``.
    """
    if workers < 1:
        raise UserError(f"workers: must be >= 1, got {workers}")
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise UserError(f"{output_path}: the output must not be the input file")
    groups = read_groups(input_path)
    log.info("ranking %d groups from %s with %s (%d worker%s)", len(groups), input_path, config.embedder.name,
             workers, "" if workers == 1 else "s")
    with tqdm(total=len(groups), unit="group", desc="rank", disable=None) as bar:
        if workers == 1:
            rows = _rank_in_process(groups, config, bar)
        else:
            rows = _rank_in_pool(groups, config, workers, bar)
    write_jsonl(output_path, [output_row(group, row) for group, row in zip(groups, rows)])
    log.info("wrote %d ranked groups to %s", len(rows), output_path)
    return len(rows)
