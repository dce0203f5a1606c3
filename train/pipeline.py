"""Run the STR stages in order: sft -> sample -> reward -> ppo -> eval.

Each stage writes ``runs/<name>/<stage>/`` and a ``DONE.json`` summary (with the settings it was made
with) when complete. Before any stage runs, :func:`plan_stages` decides what happens to each one and
the plan is logged: complete stages with the same settings are skipped; nothing finished is destroyed
without consent (a finished stage whose settings changed is replaced only with ``force``, written
beside the old one and swapped in when complete; an unfinished stage's checkpoints are continued with
``resume`` or discarded with ``force``). The reward and PPO stages train one model per STR variant
(``reward/<variant>/``, ``ppo/<variant>/``).

Under ``accelerate launch`` (``accelerate launch -m selfrank run CONFIG``) every process runs this
function. The sft, reward and ppo stages are collective (sharded global batches, see ``train.dist``);
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
import functools
import importlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from selfrank.atomic import remove_stale_temporaries, write_json, write_text
from selfrank.errors import UserError

from selfrank.train import dist
from selfrank.train.config import STAGES, ExperimentConfig
from selfrank.train.progress import set_stage
from selfrank.train.rundir import RunDir, unfinished_work
from selfrank.train.seeding import seed_everything
from selfrank.train.dist.stage_setup import stage_cost
from selfrank.train.signals import set_stops_at_steps, stop_if_requested
from selfrank.train.stages.context import Barrier, Hooks, StageContext

log = logging.getLogger(__name__)

# Stages whose loops stop at step boundaries with a checkpoint when asked (train.signals).
STEPPED_STAGES = ("sft", "sample", "reward", "ppo")
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


def stage_settings(config: ExperimentConfig, stage: str) -> dict:
    """The settings ``stage`` depends on, as plain data (its own section and those of the stages it reads)."""
    from selfrank.train.stages.sample import ranking_config_for

    relevant = {name: getattr(config, name) for name in STAGE_SETTINGS[stage]}
    if "ranking" in relevant:
        # What the sample stage ran with: a noise variant switches noise records on.
        relevant["ranking"] = ranking_config_for(config)
    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in relevant.items()}


def settings_digest(config: ExperimentConfig, stage: str) -> str:
    """A hash of the settings ``stage`` depends on: a completed stage whose digest no longer matches
    is not reused silently (see :func:`plan_stages`)."""
    import hashlib

    text = json.dumps(stage_settings(config, stage), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _flat(node, where: str = "", out: dict | None = None) -> dict:
    """Nested settings as ``{"ppo.steps": 150, ...}``."""
    out = {} if out is None else out
    if isinstance(node, dict):
        for key, value in node.items():
            _flat(value, f"{where}.{key}" if where else str(key), out)
    else:
        out[where] = node
    return out


@functools.lru_cache(maxsize=None)
def _default_settings(stage: str) -> dict:
    return _flat(json.loads(json.dumps(stage_settings(ExperimentConfig(), stage), default=str)))


def same_settings(stage: str, recorded: dict | None, recorded_digest: str | None, config: ExperimentConfig) -> bool:
    """Whether a stage recorded with ``recorded`` settings (digest ``recorded_digest``) was made with the
    settings ``config`` gives it now. A setting added to selfrank since then, left at its default, is no
    change: upgrading selfrank does not make finished stages stale."""
    if recorded_digest == settings_digest(config, stage):
        return True
    if not recorded:
        return False
    missing = object()
    before = _flat(json.loads(json.dumps(recorded, default=str)))
    after = _flat(json.loads(json.dumps(stage_settings(config, stage), default=str)))
    defaults = _default_settings(stage)
    return all(before.get(key, missing) == after.get(key, missing)
               or (key not in before and after[key] == defaults.get(key, missing))
               for key in set(before) | set(after))


def settings_changes(old: dict | None, new: dict, limit: int = 4) -> str:
    """``"ppo.steps: 150 -> 50, ..."``: what differs between two :func:`stage_settings` (at most
    ``limit`` items named), or a plain phrase when the old settings were not recorded."""
    if not old:
        return "settings changed"
    before, after = _flat(json.loads(json.dumps(old, default=str))), _flat(json.loads(json.dumps(new, default=str)))
    missing = object()
    changed = [f"{key}: {_short(before.get(key, missing))} -> {_short(after.get(key, missing))}"
               for key in sorted(set(before) | set(after)) if before.get(key, missing) != after.get(key, missing)]
    if not changed:
        return "settings changed"
    more = f", and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more


def _short(value) -> str:
    if not isinstance(value, (str, int, float, bool, type(None), list)):
        return "(unset)"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


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


STARTED = "STARTED.json"  # in a stage folder from its start: the settings it is being made with

# What a stage plan can do; see ``plan_stages``.
ACTIONS = ("skip", "run", "resume", "restart", "replace")


@dataclass
class StagePlan:
    """What the pipeline will do with one stage, decided (and said) before any stage runs.

    ``action``: "skip" (complete and current), "run" (nothing to lose), "resume" (continue its
    checkpoints), "restart" (start over, discarding an unfinished attempt: needs ``force``), "replace"
    (redo a finished stage beside it in ``<stage>.new/`` and swap it in when complete: needs
    ``force``). ``resume``: what the stage is told; ``wipe``: empty the unfinished folder first (its
    partial outputs were made with other settings); ``reason``: for the log."""
    stage: str
    action: str
    reason: str
    resume: bool = False
    wipe: bool = False

    @property
    def aside(self) -> bool:
        return self.action == "replace"

    def describe(self) -> str:
        return f"{self.stage}: {self.action} ({self.reason})"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def plan_stages(config: ExperimentConfig, stages: list[str] | None = None, *, resume: bool = False,
                force: bool = False, redo: bool = False, prerequisites: bool = True) -> list[StagePlan]:
    """Decide, for each of ``stages``, what a run does with what the run folder already holds.

    Nothing finished is destroyed without consent: a finished stage whose settings changed is replaced
    only with ``force``; an unfinished stage holding checkpoints (or, for sample, ranked groups, or for
    SFT, trained methods) is continued with ``resume`` or started over with ``force``. ``redo``
    replaces finished stages even when current (``selfrank <stage> --force``). Without consent this
    raises one ``UserError`` naming every stage concerned and both ways forward, before anything is
    written. ``prerequisites``: also refuse a stage whose inputs neither exist nor are scheduled (off
    for a job submitted now that runs after another). Reads only; every process may call it."""
    stages = list(stages or STAGES)
    if prerequisites:
        check_order(config, stages)
    run = RunDir(Path(config.output_dir) / config.name)
    plans: list[StagePlan] = []
    changed: list[str] = []
    unfinished: list[str] = []
    for stage in stages:
        settings = stage_settings(config, stage)
        finished = run.finished_folder(stage)
        aside = run.aside_folder(stage)
        if run.is_done(stage):
            summary = run.summary(stage)
            kept = summary.get("settings_digest")
            # (runs from before digests were kept count as current)
            current = kept is None or same_settings(stage, summary.get("settings"), kept, config)
            if current and not redo:
                note = f"; {aside.name}/ holds an unfinished replacement, left as it is" if aside.exists() else ""
                plans.append(StagePlan(stage, "skip", f"complete in {finished}{note}"))
                continue
            what = "redo requested" if current else settings_changes(summary.get("settings"), settings)
            if not (force or redo):
                changed.append(f"{stage} ({what})")
                continue
            started = _read_json(aside / STARTED) or {}
            keep = resume and same_settings(stage, started.get("settings"), started.get("settings_digest"), config)
            where = f"continuing the replacement in {aside}" if keep else f"written to {aside} first"
            plans.append(StagePlan(stage, "replace", f"{what}; {where}; the finished version stays until the "
                                                     "replacement is complete", resume=keep))
            continue
        work = unfinished_work(finished)
        started = _read_json(finished / STARTED)
        other_settings = started is not None and not same_settings(stage, started.get("settings"),
                                                                    started.get("settings_digest"), config)
        if work and other_settings:
            what = settings_changes(started.get("settings"), settings)
            if not force:
                unfinished.append(f"{stage} ({'; '.join(work)}; made with other settings: {what})")
                continue
            plans.append(StagePlan(stage, "restart", f"the unfinished attempt was made with other settings "
                                                     f"({what}); starting over", wipe=True))
        elif work and resume:
            plans.append(StagePlan(stage, "resume", "continuing " + "; ".join(work), resume=True))
        elif work and not force:
            unfinished.append(f"{stage} ({'; '.join(work)})")
        elif work:
            plans.append(StagePlan(stage, "restart", "starting over (--force); discarding " + "; ".join(work)))
        else:
            plans.append(StagePlan(stage, "run", "not run yet" if not finished.exists() else "not complete",
                                   resume=resume, wipe=other_settings))
    problems = []
    if changed:
        problems.append(f"{run.root} holds finished stages made with other settings: {', '.join(changed)}. "
                        "Nothing was changed. To keep them, give this run its own folder with --set name=NEW_NAME; "
                        "to replace them, add --force (each finished stage stays until its replacement is complete)")
    if unfinished:
        problems.append(f"{run.root} holds unfinished work: {', '.join(unfinished)}. Nothing was changed. "
                        "Continue it with --resume, or discard it and start over with --force")
    if problems:
        raise UserError(" | ".join(problems))
    return plans


def run_pipeline(config: ExperimentConfig, stages: list[str] | None = None, *, resume: bool = False,
                 force: bool = False, redo: bool = False, log: Callable[[dict, int, str], None] | None = None,
                 log_table: Callable[[str, list[dict], str], None] | None = None,
                 log_files: Callable[[list[Path]], None] | None = None) -> dict:
    """Run ``stages`` (default: all) in order; returns each stage's summary. Collective under a launcher.

    What happens to each stage is decided first (:func:`plan_stages`: ``resume``, ``force``, ``redo``)
    and logged before any stage runs. ``log``/``log_table``/``log_files``: optional tracking callbacks
    (see ``train.stages.context.Hooks``)."""
    logger = logging.getLogger(__name__)  # ``log`` is the tracking callback here
    stages = list(stages or STAGES)
    RunDir.for_config(config).recover(STAGES)  # a kill mid-swap: finish it before reading anything
    plans = plan_stages(config, stages, resume=resume, force=force, redo=redo)
    if dist.is_main():
        for plan in plans:
            logger.info("plan: %s", plan.describe())
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
    for plan in plans:
        stage = plan.stage
        if plan.action == "skip":
            logger.info("%s: complete, skipped (use --force to redo)", stage)
            summaries[stage] = run.summary(stage)
            continue
        digest = settings_digest(config, stage)
        if plan.aside:
            run.aside.add(stage)  # on every process: the stage's names resolve to <stage>.new
            barrier.on_main(lambda: run.set_aside(stage, keep=plan.resume))
        elif plan.wipe:
            barrier.on_main(lambda: run.reset(stage))
        else:
            # What a killed run's writes left (main process only, while the others wait at the barrier:
            # no write can be in progress there; the stage's checkpoints are loaded after this).
            barrier.on_main(lambda: remove_stale_temporaries(run.path(stage)))
        barrier.on_main(lambda: write_json(run.stage(stage) / STARTED,
                                           {"settings_digest": digest, "settings": stage_settings(config, stage)}))
        stop_if_requested(stage, 0, None, run.path(stage))  # a stop that arrived in a stage without step checks
        logger.info("%s: starting%s", stage, f" in {run.path(stage)}" if plan.aside else "")
        set_stage(stage)
        set_stops_at_steps(stage in STEPPED_STAGES)
        seed_everything(config.seed)
        started = time.perf_counter()
        if stage in INFERENCE_STAGES and barrier.world > 1:
            summary = _whole(lambda: _stage_run(stage)(config, run, plan.resume, ctx))
        else:
            summary = _stage_run(stage)(config, run, plan.resume, ctx)
        if summary is not None:  # None on the processes other than the main one
            summary["stage_seconds"] = time.perf_counter() - started
            summary.update(stage_cost(summary["stage_seconds"], barrier.world))
            summary["working_processes"] = barrier.world
            summary["settings_digest"] = digest
            summary["settings"] = stage_settings(config, stage)
            if dist.is_main():
                run.mark_done(stage, summary)
        barrier.wait()
        if plan.aside:
            barrier.on_main(lambda: run.swap_in(stage))
            run.aside.discard(stage)
            logger.info("%s: replaced the finished version with the new one", stage)
        set_stage(None)
        set_stops_at_steps(False)
        summaries[stage] = run.summary(stage)
        logger.info("%s: done in %.1fs", stage, summaries[stage].get("stage_seconds", 0.0))
    return summaries


def report_path(config: ExperimentConfig) -> Path:
    """Where the eval stage writes its Markdown report."""
    return Path(config.output_dir) / config.name / "eval" / "report.md"
