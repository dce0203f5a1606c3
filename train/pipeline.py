"""Run the STR stages in order: sft -> sample -> reward -> ppo -> eval.

Each stage writes ``runs/<name>/<stage>/`` and a ``DONE.json`` summary when complete; complete stages
are skipped (``force`` redoes them), ``resume`` continues a stage from its last checkpoint. The reward
and PPO stages train one model per STR variant (``reward/<variant>/``, ``ppo/<variant>/``).

Under ``accelerate launch`` (``accelerate launch -m selfrank run CONFIG``) every process runs this
function. The sft, reward and ppo stages are collective (sharded global batches, see ``train.distributed``);
the sample and eval stages deal their generation batches round-robin to the processes (seeded per
batch, so the outputs do not depend on the number of processes), rank through one ranking pool per
node, and the main process merges, scores and writes. Their collectives go through a gloo group
without a practical deadline (a stage may take hours; if a process dies the launcher stops the rest).
Only the main process writes ``config.yaml`` and the ``DONE.json`` summaries; each summary records
``processes`` (the world size) and ``gpu_hours`` (processes x hours on CUDA, else 0).

Tracking stays outside this package: the caller passes plain callbacks (``log``, ``log_table``,
``log_files``) that the stages call with their metrics; none of them is required.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import yaml

from selfrank.atomic import remove_stale_temporaries, write_text
from selfrank.errors import UserError

from selfrank.train import dist
from selfrank.train.config import STAGES, ExperimentConfig
from selfrank.train.rundir import RunDir
from selfrank.train.seeding import seed_everything
from selfrank.train.dist.stage_setup import stage_cost
from selfrank.train.signals import stop_if_requested
from selfrank.train.stages.context import Barrier, Hooks, StageContext

log = logging.getLogger(__name__)

# Stages that load whole (not ZeRO-partitioned) models on every process: they only generate.
INFERENCE_STAGES = ("sample", "eval")
# The module of each stage; each exposes run(config, run, resume, ctx) -> summary (None off the main process).
STAGE_MODULES = {
    "sft": "selfrank.train.stages.sft",
    "sample": "selfrank.train.stages.sample",
    "reward": "selfrank.train.stages.reward",
    "ppo": "selfrank.train.stages.ppo",
    "eval": "selfrank.train.stages.evaluate",
}


def _stage_run(stage: str) -> Callable[[ExperimentConfig, RunDir, bool, StageContext], dict | None]:
    """A stage's ``run`` (imported on first use: a stage's heavy imports cost nothing to the others)."""
    return importlib.import_module(STAGE_MODULES[stage]).run


# What each stage reads from earlier ones.
PREREQUISITES = {"sft": (), "sample": ("sft",), "reward": ("sft", "sample"), "ppo": ("sft", "reward"), "eval": ("sft",)}

# The settings each stage's outputs depend on (its own section and those of the stages it reads).
STAGE_SETTINGS = {
    "sft": ("seed", "task", "model", "sft"),
    "sample": ("seed", "task", "model", "sft", "sample", "ranking"),
    "reward": ("seed", "task", "model", "sft", "sample", "ranking", "reward", "variants"),
    "ppo": ("seed", "task", "model", "sft", "sample", "ranking", "reward", "variants", "ppo"),
    "eval": ("seed", "task", "model", "sft", "sample", "ranking", "reward", "variants", "ppo", "eval"),
}


def settings_digest(config: ExperimentConfig, stage: str) -> str:
    """A hash of the settings ``stage`` depends on: a completed stage whose digest no longer matches
    is redone instead of being silently reused."""
    import hashlib

    from selfrank.train.stages.sample import ranking_config_for

    relevant = {name: getattr(config, name) for name in STAGE_SETTINGS[stage]}
    if "ranking" in relevant:
        # What the sample stage ran with: a noise variant switches noise records on.
        relevant["ranking"] = ranking_config_for(config)
    text = json.dumps({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in relevant.items()},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_order(config: ExperimentConfig, stages: list[str]) -> None:
    """Refuse, before anything is written, a stage whose inputs neither exist nor are scheduled."""
    root = RunDir(Path(config.output_dir) / config.name)
    for stage in stages:
        for needed in PREREQUISITES[stage]:
            if needed not in stages and not root.is_done(needed):
                raise UserError(f"stage '{stage}' needs stage '{needed}' first: run 'selfrank {needed} CONFIG' "
                                f"(or 'selfrank run CONFIG'); nothing found in {root.root}")


def _whole(fn):
    """Run an inference stage with whole model weights on every process (ZeRO-3 would partition them)."""
    from selfrank.train import dist

    with dist.whole_weights(dist.get_accelerator()):
        return fn()


def _write_config(run: RunDir, config: ExperimentConfig) -> None:
    # The run folder's own files (config.yaml, the tracker's id) are written once per start: a killed
    # start may have left their temporaries (one run folder has one pipeline at a time).
    remove_stale_temporaries(run.root, recursive=False)
    write_text(run.root / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def _prepare_folder(run: RunDir, stage: str, redo: bool) -> None:
    """Empty a stage's folder to redo it, or clear what a killed run's writes left in it. Main process
    only, while the others wait at the barrier: no write can be in progress there (a stage writes
    only its own folder, and its checkpoints are loaded after this)."""
    if redo:
        run.reset(stage)
    else:
        remove_stale_temporaries(run.root / stage)


def run_pipeline(config: ExperimentConfig, stages: list[str] | None = None, *, resume: bool = False,
                 force: bool = False, log: Callable[[dict, int, str], None] | None = None,
                 log_table: Callable[[str, list[dict], str], None] | None = None,
                 log_files: Callable[[list[Path]], None] | None = None) -> dict:
    """Run ``stages`` (default: all) in order; returns each stage's summary. Collective under a launcher.

    ``log``/``log_table``/``log_files``: optional tracking callbacks (see ``train.stages.context.Hooks``)."""
    logger = logging.getLogger(__name__)  # ``log`` is the tracking callback here
    stages = list(stages or STAGES)
    check_order(config, stages)
    if config.torch_threads:
        # Intra-op threads for this process. On a small machine shared with the ranking workers, one
        # thread avoids oversubscription (measured: 2 threads ran a tiny model's step 4-20x slower
        # while a worker was busy).
        import torch

        torch.set_num_threads(config.torch_threads)
    hooks = Hooks(**{name: fn for name, fn in (("log", log), ("log_table", log_table), ("log_files", log_files))
                     if fn is not None})
    dist.get_accelerator(mixed_precision=config.model.mixed_precision)  # the run's precision, set once (train/precision.py)
    barrier = Barrier()
    ctx = StageContext(hooks, barrier)
    run = RunDir.for_config(config)
    barrier.on_main(lambda: _write_config(run, config))
    summaries = {}
    for stage in stages:
        digest = settings_digest(config, stage)
        redo = force
        if run.is_done(stage) and not force:
            kept = run.summary(stage).get("settings_digest")
            if kept is None or kept == digest:  # (runs from before digests were kept count as current)
                logger.info("%s: complete, skipped (use --force to redo)", stage)
                summaries[stage] = run.summary(stage)
                continue
            logger.warning("%s: its settings changed since it completed; redoing it", stage)
            redo = True
        barrier.on_main(lambda: _prepare_folder(run, stage, redo))
        stop_if_requested(stage, 0, None, run.root)  # a stop that arrived in a stage without step checks
        logger.info("%s: starting", stage)
        seed_everything(config.seed)
        started = time.perf_counter()
        if stage in INFERENCE_STAGES and barrier.world > 1:
            summary = _whole(lambda: _stage_run(stage)(config, run, resume, ctx))
        else:
            summary = _stage_run(stage)(config, run, resume, ctx)
        if summary is not None:  # None on the processes other than the main one
            summary["stage_seconds"] = time.perf_counter() - started
            summary.update(stage_cost(summary["stage_seconds"], barrier.world))
            summary["working_processes"] = barrier.world
            summary["settings_digest"] = digest
            if dist.is_main():
                run.mark_done(stage, summary)
        barrier.wait()
        summaries[stage] = summary if summary is not None else run.summary(stage)
        logger.info("%s: done in %.1fs", stage, summaries[stage].get("stage_seconds", 0.0))
    report = run.root / "eval" / "report.md"
    if "eval" in stages and report.is_file() and dist.is_main():
        print(report.read_text(encoding="utf-8"))
    return summaries
