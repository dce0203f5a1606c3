"""The eval stage: every row (original, SFT, baselines, STR variants) on the test split, with CIs,
ranking agreement, report.md/.json and plots (the machinery: ``train/evaluation/``)."""
from __future__ import annotations

from pathlib import Path

from selfrank.train.config import ExperimentConfig
from selfrank.train.data.tasks import load_prompted_task
from selfrank.train.evaluation.evaluate import evaluate_rows
from selfrank.train.rundir import RunDir
from selfrank.train.stages.context import StageContext


def eval_rows(config: ExperimentConfig, run: RunDir) -> list[tuple[str, Path]]:
    """The report's rows: original, SFT, each baseline, each STR variant (those that exist)."""
    sft = run.path("sft")
    rows = [("original", sft / "original"), ("sft", sft / "model")]
    rows += [(method, sft / "baselines" / method / "model") for method in config.sft.baselines]
    rows += [(variant, run.path(f"ppo/{variant}") / "actor") for variant in config.variants
             if run.is_done(f"ppo/{variant}")]
    return [(name, folder) for name, folder in rows if folder.is_dir()]


def run(config: ExperimentConfig, run: RunDir, resume: bool, ctx: StageContext) -> dict | None:
    examples = load_prompted_task(config, run.require("sft") / "model").test
    reward_folders = {v: run.path(f"reward/{v}") / "model" for v in config.variants if run.is_done(f"reward/{v}")}
    ppo_logs = {v: run.path(f"ppo/{v}") / "log.jsonl" for v in config.variants if run.is_done(f"ppo/{v}")}
    # Wall time of the stages before this one (their last run, when resumed), shown in the report.
    stage_seconds = {stage: run.summary(stage).get("stage_seconds") for stage in ("sft", "sample", "reward", "ppo")
                     if run.is_done(stage)}
    results = evaluate_rows(config, eval_rows(config, run), examples, run.stage("eval"),
                            reward_folders=reward_folders, ppo_logs=ppo_logs, task_kind=config.task.kind,
                            group=ctx.barrier.group, stage_seconds=stage_seconds,
                            sft_runs=run.summary("sft").get("runs") if run.is_done("sft") else None)
    if results is None:  # another process: the main one scores and reports
        return None
    ctx.hooks.log(eval_metrics(results), 0, "eval")
    eval_dir = run.path("eval")
    ctx.hooks.log_files(sorted(p for p in eval_dir.iterdir() if p.is_file() and p.name.startswith("report"))
                    + sorted(eval_dir.glob("*.png")))
    return {"rows": list(results.get("rows", {})), "report": str(eval_dir / "report.md")}


def eval_metrics(results: dict) -> dict[str, float]:
    """The report's scalars, flat: ``<row>/<metric>`` (mean), ``<row>/corpus_bleu``."""
    flat: dict[str, float] = {}
    for row, values in (results.get("rows") or {}).items():
        for metric, ci in values.get("metrics", {}).items():
            flat[f"{row}/{metric}"] = float(ci["mean"])
        if isinstance(values.get("corpus_bleu"), (int, float)):
            flat[f"{row}/corpus_bleu"] = float(values["corpus_bleu"])
    return flat
