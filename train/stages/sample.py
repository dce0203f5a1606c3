"""Sample stage: K answers per training prompt from the SFT model, ranked by STR.

Generation runs in this process while a pool of CPU workers ranks the finished groups through a
queue (``ranking.pool``), so ranking hides behind generation. Outputs in ``runs/<name>/sample/``:
``ranked.jsonl`` (one ranked group per prompt) and ``pairs.jsonl`` (one (winner, loser) pair per line).

Under a launcher the batches are dealt round-robin to the processes (batch ``i`` to rank
``i % world``), every process feeds its node's shared ranking pool (``train.dist.ranking_service``), and
the main process merges the results. Each answer is seeded by its example's id and its index
(``answer_seeds``), so the samples, and so the outputs, are the same for any number of processes and
any batch size. Each prompt is prefilled once for its K answers (``sample.sampler``). Each process
appends what it has ranked to its own ``progress.<rank>.jsonl``; a killed run resumes from all of
them, with any number of processes.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path

from selfrank.atomic import write_jsonl
from selfrank.jsonl import read_appended_rows
from selfrank.ranking.config import RankingConfig
from selfrank.ranking.engine import stable_seed

from selfrank.train.config import ExperimentConfig
from selfrank.train.rundir import RunDir
from selfrank.train.progress import StepProgress
from selfrank.train.signals import stop_if_requested
from selfrank.train.stages.context import StageContext

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


def _read_progress(path: Path) -> dict[str, dict]:
    """The groups in one progress file, up to a torn last line (a kill mid-write)."""
    return {group["id"]: group for group in read_appended_rows(path)}


def _load_progress(folder: Path) -> dict[str, dict]:
    """Groups ranked so far, from every process's progress file (whatever the world size was)."""
    done: dict[str, dict] = {}
    for path in sorted(folder.glob("progress.*.jsonl")):
        done.update(_read_progress(path))
    return done


def answer_seeds(seed: int, examples, k: int) -> list[int]:
    """One sampling seed per answer, from the run's seed, the example's id and the answer's index: an
    answer does not depend on the batching nor on the number of processes."""
    return [stable_seed("sample", seed, ex.id, j) for ex in examples for j in range(k)]


def run(config: ExperimentConfig, run: RunDir, resume: bool, ctx: StageContext | None = None) -> dict | None:
    """Sample and rank; collective under a launcher. The summary on the main process, None elsewhere.

    ``ctx.barrier`` (``wait()`` and a gloo ``group``) is needed with several processes."""
    from selfrank.ranking.ranker import Ranker

    from selfrank.train import dist
    from selfrank.train.data.prompts import format_task
    from selfrank.train.data.tasks import load_task
    from selfrank.train.sampling.generation import generate
    from selfrank.train.models.causal_lm import load_model
    from selfrank.train.dist.ranking_service import ranking_pool

    ctx = ctx or StageContext()
    barrier = ctx.barrier
    rank = dist.rank()
    wait = barrier.wait
    sft_model = run.require("sft") / "model"
    out = run.stage("sample")
    if not resume and dist.is_main():
        for stale in out.glob("progress.*.jsonl"):
            stale.unlink()
    wait()
    done = _load_progress(out)
    wait()  # everyone has read every file before anyone rewrites its own
    progress_path = out / f"progress.{rank}.jsonl"
    if progress_path.is_file():  # rewritten without a torn last line: new rows start on their own line
        write_jsonl(progress_path, _read_progress(progress_path).values())

    model, tokenizer = load_model(sft_model, config.model)
    data = format_task(load_task(config.task), tokenizer, config)
    examples = data.train[: config.sample.max_prompts] if config.sample.max_prompts else data.train
    model = dist.autocast_forward(model, dist.get_accelerator())  # model.mixed_precision, as in training
    ranking = ranking_config_for(config)
    k, size = config.sample.samples_per_prompt, config.sample.batch_size
    batches = dist.round_robin([examples[start:start + size] for start in range(0, len(examples), size)])

    started = time.perf_counter()
    generate_s = 0.0
    failures: list[str] = []
    pool_stats: dict = {}
    with open(progress_path, "a", encoding="utf-8") as progress, contextlib.ExitStack() as stack:

        def keep(group: dict) -> None:
            done[group["id"]] = group
            progress.write(json.dumps(group, ensure_ascii=False) + "\n")
            progress.flush()

        def take(result) -> None:
            if result.error is not None:
                failures.append(f"{result.id}: {result.error}")
            else:
                keep(result.ranked.to_json())

        pool = None
        if config.sample.async_ranking:
            pool = stack.enter_context(ranking_pool(ranking, config.sample.workers,
                                                    group=barrier.group, wait=wait))
        ranker = None if pool else Ranker(ranking)
        for index, batch in StepProgress("sample+rank", len(batches), iterable=batches, unit="batch"):
            stop_if_requested("sample", index, None, progress_path)  # the progress files are the checkpoint
            todo = [ex for ex in batch if ex.id not in done]
            if not todo:
                continue
            tick = time.perf_counter()
            generation = generate(
                model, tokenizer, [ex.prompt for ex in batch], n=k, do_sample=True,
                temperature=config.sample.temperature, top_p=config.sample.top_p,
                max_new_tokens=config.sample.max_new_tokens, seeds=answer_seeds(config.seed, batch, k),
                batch_size=size * k, method=config.sample.sampler,
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

    wait()  # every process has written all it ranked
    group = barrier.group
    failures = dist.gather_lists(failures, group)
    generate_s = sum(dist.gather_lists([generate_s], group))
    if failures:
        raise RuntimeError(f"{len(failures)} groups failed to rank; first: {failures[0]}")
    if not dist.is_main():
        wait()
        return None
    done = _load_progress(out)
    missing = [ex.id for ex in examples if ex.id not in done]
    if missing:
        raise RuntimeError(f"sample: {len(missing)} prompts were not ranked (first: {missing[0]})")
    ordered = [done[ex.id] for ex in examples]
    write_jsonl(out / "ranked.jsonl", ordered)
    n_pairs = write_jsonl(out / "pairs.jsonl", (row for group in ordered for row in pair_rows(group)))
    for path in out.glob("progress.*.jsonl"):
        path.unlink()
    wait()
    seconds = time.perf_counter() - started
    summary = {
        "prompts": len(ordered),
        "samples": len(ordered) * k,
        "pairs": n_pairs,
        "pairs_noised": sum(1 for g in ordered for r in (g.get("noise") or []) if r),
        "mean_representatives": sum(len(g["representatives"]) for g in ordered) / max(len(ordered), 1),
        "seconds": seconds,
        "generate_seconds": generate_s,  # summed over processes
        "ranking": {key: v for key, v in pool_stats.items() if isinstance(v, (int, float))},
    }
    log.info("sample: %d prompts, %d pairs in %.1fs", summary["prompts"], n_pairs, seconds)
    ctx.hooks.log_table("answers", ordered, "sample")
    ctx.hooks.log({k: v for k, v in summary.items() if isinstance(v, (int, float))}, 0, "sample")
    return summary
