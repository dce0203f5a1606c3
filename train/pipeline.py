"""Run the STR stages in order: sft -> sample -> reward -> ppo -> eval.

Each stage writes ``runs/<name>/<stage>/`` and a ``DONE.json`` summary when complete; complete stages
are skipped (``force`` redoes them), ``resume`` continues a stage from its last checkpoint. The reward
and PPO stages train one model per STR variant (``reward/<variant>/``, ``ppo/<variant>/``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import yaml

from ranking.atomic import write_text
from ranking.errors import UserError

from .config import STAGES, ExperimentConfig
from .rundir import RunDir
from .seeding import seed_everything

log = logging.getLogger(__name__)

# Variant -> (reward loss, use noised losers, online RM refresh during PPO).
VARIANT_SETTINGS = {
    "str": ("pairwise", False, False),
    "str_noise": ("pairwise", True, False),
    "str_listwise": ("listwise", False, False),
    "str_online": ("pairwise", False, True),
}


def _stage_sft(config: ExperimentConfig, run: RunDir, resume: bool) -> dict:
    from .sft import run as run_sft

    return run_sft(config, run, resume)


def _stage_sample(config: ExperimentConfig, run: RunDir, resume: bool) -> dict:
    from .sample import run as run_sample

    return run_sample(config, run, resume)


def _reference_samples(ranked_path: Path) -> tuple[list[str], list[str]]:
    """Every SFT sample of the sample stage: the reference-policy distribution the RM is normalised on."""
    prompts, responses = [], []
    with open(ranked_path, encoding="utf-8") as handle:
        for line in handle:
            group = json.loads(line)
            prompts += [group["prompt"]] * len(group["responses"])
            responses += group["responses"]
    return prompts, responses


def _stage_reward(config: ExperimentConfig, run: RunDir, resume: bool) -> dict:
    from .reward import train_reward

    sample = run.require("sample")
    sft_model = run.require("sft") / "model"
    prompts, responses = _reference_samples(sample / "ranked.jsonl")
    summaries = {}
    for variant in config.variants:
        stage = f"reward/{variant}"
        if run.is_done(stage):
            summaries[variant] = run.summary(stage)
            continue
        loss, use_noise, _ = VARIANT_SETTINGS[variant]
        seed_everything(config.seed)
        summary = train_reward(
            config, sft_model, sample / "pairs.jsonl", sample / "ranked.jsonl", run.stage(stage) / "model",
            loss=loss, use_noise=use_noise, resume=resume,
            normalize_prompts=prompts, normalize_responses=responses,
        )
        run.mark_done(stage, summary)
        summaries[variant] = summary
    return {"variants": summaries}


def _stage_ppo(config: ExperimentConfig, run: RunDir, resume: bool) -> dict:
    from ranking.pool import RankingPool

    from .data import load_task
    from .ppo import train_ppo

    sft_model = run.require("sft") / "model"
    prompts = [ex.prompt for ex in load_task(config.task).train]
    summaries = {}
    for variant in config.variants:
        stage = f"ppo/{variant}"
        if run.is_done(stage):
            summaries[variant] = run.summary(stage)
            continue
        rm_folder = run.require(f"reward/{variant}") / "model"
        _, _, online = VARIANT_SETTINGS[variant]
        seed_everything(config.seed)
        pool = RankingPool(config.ranking, workers=config.sample.workers) if online else None
        try:
            summary = train_ppo(config, prompts, sft_model, rm_folder, run.stage(stage), resume=resume,
                                ranking_pool=pool, online_rm=online)
        finally:
            if pool is not None:
                pool.close()
        run.mark_done(stage, summary)
        summaries[variant] = summary
    return {"variants": summaries}


def eval_rows(config: ExperimentConfig, run: RunDir) -> list[tuple[str, Path]]:
    """The report's rows: original, SFT, each baseline, each STR variant (those that exist)."""
    sft = run.root / "sft"
    rows = [("original", sft / "original"), ("sft", sft / "model")]
    rows += [(method, sft / "baselines" / method / "model") for method in config.sft.baselines]
    rows += [(variant, run.root / "ppo" / variant / "actor") for variant in config.variants
             if run.is_done(f"ppo/{variant}")]
    return [(name, folder) for name, folder in rows if folder.is_dir()]


def _stage_eval(config: ExperimentConfig, run: RunDir, resume: bool) -> dict:
    from .data import load_task
    from .evaluate import evaluate_rows

    run.require("sft")
    examples = load_task(config.task).test
    reward_folders = {v: run.root / "reward" / v / "model" for v in config.variants if run.is_done(f"reward/{v}")}
    ppo_logs = {v: run.root / "ppo" / v / "log.jsonl" for v in config.variants if run.is_done(f"ppo/{v}")}
    results = evaluate_rows(config, eval_rows(config, run), examples, run.stage("eval"),
                            reward_folders=reward_folders, ppo_logs=ppo_logs, task_kind=config.task.kind)
    return {"rows": list(results.get("rows", {})), "report": str(run.root / "eval" / "report.md")}


STAGE_FUNCS: dict[str, Callable[[ExperimentConfig, RunDir, bool], dict]] = {
    "sft": _stage_sft,
    "sample": _stage_sample,
    "reward": _stage_reward,
    "ppo": _stage_ppo,
    "eval": _stage_eval,
}


# What each stage reads from earlier ones.
PREREQUISITES = {"sft": (), "sample": ("sft",), "reward": ("sft", "sample"), "ppo": ("sft", "reward"), "eval": ("sft",)}


def check_order(config: ExperimentConfig, stages: list[str]) -> None:
    """Refuse, before anything is written, a stage whose inputs neither exist nor are scheduled."""
    root = RunDir(Path(config.output_dir) / config.name)
    for stage in stages:
        for needed in PREREQUISITES[stage]:
            if needed not in stages and not root.is_done(needed):
                raise UserError(f"stage '{stage}' needs stage '{needed}' first: run 'selfrank {needed} CONFIG' "
                                f"(or 'selfrank run CONFIG'); nothing found in {root.root}")


def run_pipeline(config: ExperimentConfig, stages: list[str] | None = None, *, resume: bool = False,
                 force: bool = False) -> dict:
    stages = list(stages or STAGES)
    check_order(config, stages)
    run = RunDir.for_config(config)
    write_text(run.root / "config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    summaries = {}
    for stage in stages:
        if run.is_done(stage) and not force:
            log.info("%s: complete, skipped (use --force to redo)", stage)
            summaries[stage] = run.summary(stage)
            continue
        if force:
            run.reset(stage)
        log.info("%s: starting", stage)
        seed_everything(config.seed)
        started = time.perf_counter()
        summary = STAGE_FUNCS[stage](config, run, resume)
        summary["stage_seconds"] = time.perf_counter() - started
        run.mark_done(stage, summary)
        summaries[stage] = summary
        log.info("%s: done in %.1fs", stage, summary["stage_seconds"])
    report = run.root / "eval" / "report.md"
    if "eval" in stages and report.is_file():
        print(report.read_text(encoding="utf-8"))
    return summaries
