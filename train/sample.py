"""Sample stage: K answers per training prompt from the SFT model, ranked by STR.

Generation runs in this process while a pool of CPU workers ranks the finished groups through a
queue (``ranking.pool``), so ranking hides behind generation. Outputs in ``runs/<name>/sample/``:
``ranked.jsonl`` (one ranked group per prompt) and ``pairs.jsonl`` (one (winner, loser) pair per line).
A killed run resumes from ``progress.jsonl``, which holds the groups ranked so far (batches are seeded
by their index, so a resumed run produces the same samples).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from ranking.atomic import write_jsonl
from ranking.config import RankingConfig

from .config import ExperimentConfig
from .rundir import RunDir
from .signals import stop_if_requested

log = logging.getLogger(__name__)


def ranking_config_for(config: ExperimentConfig) -> RankingConfig:
    """The ranking settings of the run, with noise records on when a noise variant needs them.

    Noise only decorates pairs with a perturbed loser (``loser_noised``); the plain variants ignore it,
    so one sample stage serves every variant."""
    ranking = copy.deepcopy(config.ranking)
    if "str_noise" in config.variants:
        ranking.noise.enabled = True
    return ranking


def pair_rows(group: dict) -> list[dict]:
    """Flatten one ranked group into pair rows for the reward model."""
    rows = []
    responses = group["responses"]
    noise = group.get("noise") or [None] * len(group["pairs"])
    for (winner, loser), record in zip(group["pairs"], noise):
        rows.append({
            "group_id": group["id"],
            "prompt": group["prompt"],
            "winner": responses[winner],
            "loser": responses[loser],
            "winner_index": winner,
            "loser_index": loser,
            "loser_noised": record["text"] if record else None,
            "noise_kind": record["kind"] if record else None,
        })
    return rows


def _load_progress(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                group = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill: everything before it is intact
            done[group["id"]] = group
    return done


def run(config: ExperimentConfig, run: RunDir, resume: bool) -> dict:
    from ranking.pool import RankingPool
    from ranking.ranker import Ranker

    from .data import load_task
    from .generation import generate
    from .models import load_model

    sft_model = run.require("sft") / "model"
    out = run.stage("sample")
    progress_path = out / "progress.jsonl"
    if not resume:
        progress_path.unlink(missing_ok=True)
    done = _load_progress(progress_path)
    if progress_path.is_file():  # drop a torn last line (a kill mid-write): new rows start on their own line
        write_jsonl(progress_path, done.values())

    data = load_task(config.task)
    examples = data.train[: config.sample.max_prompts] if config.sample.max_prompts else data.train
    model, tokenizer = load_model(sft_model, config.model)
    ranking = ranking_config_for(config)
    k, size = config.sample.k, config.sample.batch_size
    batches = [examples[i:i + size] for i in range(0, len(examples), size)]

    started = time.perf_counter()
    generate_s = 0.0
    failures: list[str] = []
    with open(progress_path, "a", encoding="utf-8") as progress:

        def keep(group: dict) -> None:
            done[group["id"]] = group
            progress.write(json.dumps(group, ensure_ascii=False) + "\n")
            progress.flush()

        def take(result) -> None:
            if result.error is not None:
                failures.append(f"{result.id}: {result.error}")
            else:
                keep(result.ranked.to_json())

        pool = RankingPool(ranking, workers=config.sample.workers) if config.sample.async_ranking else None
        ranker = None if pool else Ranker(ranking)
        try:
            for index, batch in enumerate(tqdm(batches, desc="sample+rank", unit="batch")):
                stop_if_requested("sample", index, None, progress_path)  # the progress file is the checkpoint
                todo = [ex for ex in batch if ex.id not in done]
                if not todo:
                    continue
                tick = time.perf_counter()
                generation = generate(
                    model, tokenizer, [ex.prompt for ex in batch], n=k, do_sample=True,
                    temperature=config.sample.temperature, top_p=config.sample.top_p,
                    max_new_tokens=config.sample.max_new_tokens, seed=config.seed * 100_003 + index,
                    batch_size=size * k,
                )
                generate_s += time.perf_counter() - tick
                groups = [
                    {"id": ex.id, "prompt": ex.prompt, "responses": generation.texts[i * k:(i + 1) * k]}
                    for i, ex in enumerate(batch) if ex.id not in done
                ]
                if pool is not None:
                    for group in groups:
                        pool.submit(group["id"], group["prompt"], group["responses"])
                    for result in pool.poll():
                        take(result)
                else:
                    for ranked in ranker.rank(groups):
                        keep(ranked.to_json())
            if pool is not None:
                for result in pool.drain():
                    take(result)
                pool_stats = pool.stats()
            else:
                pool_stats = {}
        finally:
            if pool is not None:
                pool.close()

    if failures:
        raise RuntimeError(f"{len(failures)} groups failed to rank; first: {failures[0]}")
    ordered = [done[ex.id] for ex in examples]
    write_jsonl(out / "ranked.jsonl", ordered)
    n_pairs = write_jsonl(out / "pairs.jsonl", (row for group in ordered for row in pair_rows(group)))
    progress_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    summary = {
        "prompts": len(ordered),
        "samples": len(ordered) * k,
        "pairs": n_pairs,
        "pairs_noised": sum(1 for g in ordered for r in (g.get("noise") or []) if r),
        "mean_representatives": sum(len(g["representatives"]) for g in ordered) / max(len(ordered), 1),
        "seconds": seconds,
        "generate_seconds": generate_s,
        "ranking": {key: v for key, v in pool_stats.items() if isinstance(v, (int, float))},
    }
    log.info("sample: %d prompts, %d pairs in %.1fs", summary["prompts"], n_pairs, seconds)
    return summary
