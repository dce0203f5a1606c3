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
import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import yaml

from selfrank.atomic import write_text
from selfrank.errors import UserError

from selfrank.train import dist
from selfrank.train.config import STAGES, ExperimentConfig
from selfrank.train.rundir import RunDir
from selfrank.train.seeding import seed_everything
from selfrank.train.dist.stage_setup import stage_cost
from selfrank.train.signals import stop_if_requested

log = logging.getLogger(__name__)

# Stages that load whole (not ZeRO-partitioned) models on every process: they only generate.
INFERENCE_STAGES = ("sample", "eval")
# Waiting at a barrier of the sample/eval stages has no practical deadline (the process group's own
# timeout is minutes, and one process may finish its share long before another).
_WAIT_TIMEOUT = timedelta(days=30)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@dataclass
class Hooks:
    """Where stages report, all optional (no-ops by default); called on the main process only.

    ``log(metrics, step, stage)``: scalars of one step of a stage (SFT loss/lr, RM loss/accuracy, eval
    metrics at step 0). ``log_table(name, groups, stage)``: ranked groups (``RankedGroup.to_json()``
    dicts) for a table of sampled answers. ``log_files(paths)``: report files to keep as artifacts.
    """
    log: Callable[[dict, int, str], None] = _ignore
    log_table: Callable[[str, list[dict], str], None] = _ignore
    log_files: Callable[[list[Path]], None] = _ignore

    def stage_log(self, stage: str, prefix: str = "") -> Callable[[dict, int], None]:
        """``log(metrics, step)`` for one stage (keys under ``prefix``), silent on non-main ranks."""
        if not dist.is_main():
            return _ignore
        return lambda metrics, step: self.log({prefix + k: v for k, v in metrics.items()}, step, stage)


class _Barrier:
    """Barriers for a multi-process run: ``wait`` has no practical deadline (a gloo group of its own)."""

    def __init__(self):
        self.world = dist.world_size()
        self.group = None
        if self.world > 1:
            import torch.distributed as tdist

            dist.get_accelerator()  # the process group
            self.group = tdist.new_group(backend="gloo", timeout=_WAIT_TIMEOUT)

    def wait(self) -> None:
        if self.group is not None:
            import torch.distributed as tdist

            tdist.barrier(group=self.group)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the main process while the others wait; its result on main, None elsewhere."""
        result = fn() if dist.is_main() else None
        self.wait()
        return result


# Variant -> (reward loss, use noised losers, online RM refresh during PPO).
VARIANT_SETTINGS = {
    "str": ("pairwise", False, False),
    "str_noise": ("pairwise", True, False),
    "str_listwise": ("listwise", False, False),
    "str_online": ("pairwise", False, True),
}


def _stage_sft(config: ExperimentConfig, run: RunDir, resume: bool, hooks: Hooks,
               barrier: "_Barrier") -> dict | None:
    from selfrank.train.stages.sft import run as run_sft

    return run_sft(config, run, resume, log_step=hooks.stage_log("sft"))


def _stage_sample(config: ExperimentConfig, run: RunDir, resume: bool, hooks: Hooks,
                  barrier: "_Barrier") -> dict | None:
    from selfrank.train.stages.sample import run as run_sample

    summary = run_sample(config, run, resume, barrier=barrier)
    if summary is None:  # another process; the main one writes the outputs and logs
        return None
    groups = [json.loads(line) for line in (run.root / "sample" / "ranked.jsonl").open(encoding="utf-8")]
    hooks.log_table("answers", groups, "sample")
    hooks.log({k: v for k, v in summary.items() if isinstance(v, (int, float))}, 0, "sample")
    return summary


def _reference_samples(ranked_path: Path) -> tuple[list[str], list[str]]:
    """Every SFT sample of the sample stage: the reference-policy distribution the RM is normalised on."""
    prompts, responses = [], []
    with open(ranked_path, encoding="utf-8") as handle:
        for line in handle:
            group = json.loads(line)
            prompts += [group["prompt"]] * len(group["responses"])
            responses += group["responses"]
    return prompts, responses


def _per_variant(config: ExperimentConfig, run: RunDir, name: str, train_one: Callable[[str, str], dict]) -> dict:
    """Run ``train_one(variant, stage)`` for each STR variant whose ``<name>/<variant>`` is not complete."""
    summaries = {}
    for variant in config.variants:
        stage = f"{name}/{variant}"
        if run.is_done(stage):
            summaries[variant] = run.summary(stage)
            continue
        seed_everything(config.seed)
        summaries[variant] = train_one(variant, stage)
        if dist.is_main():
            run.mark_done(stage, summaries[variant])
    return {"variants": summaries}


def _stage_reward(config: ExperimentConfig, run: RunDir, resume: bool, hooks: Hooks,
                  barrier: "_Barrier") -> dict | None:
    from selfrank.train.stages.reward import train_reward

    sample = run.require("sample")
    sft_model = run.require("sft") / "model"
    prompts, responses = _reference_samples(sample / "ranked.jsonl")

    def train_one(variant: str, stage: str) -> dict:
        loss, use_noise, _ = VARIANT_SETTINGS[variant]
        return train_reward(
            config, sft_model, sample / "pairs.jsonl", sample / "ranked.jsonl", run.stage(stage) / "model",
            loss=loss, use_noise=use_noise, resume=resume,
            normalize_prompts=prompts, normalize_responses=responses,
            log_step=hooks.stage_log("reward", f"{variant}/"),
        )

    return _per_variant(config, run, "reward", train_one)


def _stage_ppo(config: ExperimentConfig, run: RunDir, resume: bool, hooks: Hooks,
               barrier: "_Barrier") -> dict | None:
    from selfrank.train.data.tasks import load_prompted_task
    from selfrank.train.stages.ppo import train_ppo
    from selfrank.train.dist.ranking_service import ranking_pool

    sft_model = run.require("sft") / "model"
    prompts = [ex.prompt for ex in load_prompted_task(config, sft_model).train]

    def train_one(variant: str, stage: str) -> dict:
        rm_folder = run.require(f"reward/{variant}") / "model"
        _, _, online = VARIANT_SETTINGS[variant]
        if not online:
            return train_ppo(config, prompts, sft_model, rm_folder, run.stage(stage), resume=resume)
        # The online variant ranks its rollouts through the node's pool (collective, like PPO itself).
        with ranking_pool(config.ranking, config.sample.workers, group=barrier.group, wait=barrier.wait,
                          ready=True) as pool:
            return train_ppo(config, prompts, sft_model, rm_folder, run.stage(stage), resume=resume,
                             ranking_pool=pool, online_rm=True)

    return _per_variant(config, run, "ppo", train_one)


def eval_rows(config: ExperimentConfig, run: RunDir) -> list[tuple[str, Path]]:
    """The report's rows: original, SFT, each baseline, each STR variant (those that exist)."""
    sft = run.root / "sft"
    rows = [("original", sft / "original"), ("sft", sft / "model")]
    rows += [(method, sft / "baselines" / method / "model") for method in config.sft.baselines]
    rows += [(variant, run.root / "ppo" / variant / "actor") for variant in config.variants
             if run.is_done(f"ppo/{variant}")]
    return [(name, folder) for name, folder in rows if folder.is_dir()]


def _stage_eval(config: ExperimentConfig, run: RunDir, resume: bool, hooks: Hooks,
                barrier: "_Barrier") -> dict | None:
    from selfrank.train.data.tasks import load_prompted_task
    from selfrank.train.evaluation.evaluate import evaluate_rows

    examples = load_prompted_task(config, run.require("sft") / "model").test
    reward_folders = {v: run.root / "reward" / v / "model" for v in config.variants if run.is_done(f"reward/{v}")}
    ppo_logs = {v: run.root / "ppo" / v / "log.jsonl" for v in config.variants if run.is_done(f"ppo/{v}")}
    results = evaluate_rows(config, eval_rows(config, run), examples, run.stage("eval"),
                            reward_folders=reward_folders, ppo_logs=ppo_logs, task_kind=config.task.kind,
                            group=barrier.group)
    if results is None:  # another process: the main one scores and reports
        return None
    hooks.log(eval_metrics(results), 0, "eval")
    eval_dir = run.root / "eval"
    hooks.log_files(sorted(p for p in eval_dir.iterdir() if p.is_file() and p.name.startswith("report"))
                    + sorted(eval_dir.glob("*.png")))
    return {"rows": list(results.get("rows", {})), "report": str(run.root / "eval" / "report.md")}


def eval_metrics(results: dict) -> dict[str, float]:
    """The report's scalars, flat: ``<row>/<metric>`` (mean), ``<row>/corpus_bleu``."""
    flat: dict[str, float] = {}
    for row, values in (results.get("rows") or {}).items():
        for metric, ci in values.get("metrics", {}).items():
            flat[f"{row}/{metric}"] = float(ci["mean"])
        if isinstance(values.get("corpus_bleu"), (int, float)):
            flat[f"{row}/corpus_bleu"] = float(values["corpus_bleu"])
    return flat


STAGE_FUNCS: dict[str, Callable[[ExperimentConfig, RunDir, bool, Hooks, _Barrier], dict | None]] = {
    "sft": _stage_sft,
    "sample": _stage_sample,
    "reward": _stage_reward,
    "ppo": _stage_ppo,
    "eval": _stage_eval,
}


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


def run_pipeline(config: ExperimentConfig, stages: list[str] | None = None, *, resume: bool = False,
                 force: bool = False, log: Callable[[dict, int, str], None] | None = None,
                 log_table: Callable[[str, list[dict], str], None] | None = None,
                 log_files: Callable[[list[Path]], None] | None = None) -> dict:
    """Run ``stages`` (default: all) in order; returns each stage's summary. Collective under a launcher.

    ``log``/``log_table``/``log_files``: optional tracking callbacks (see :class:`Hooks`)."""
    logger = logging.getLogger(__name__)  # ``log`` is the tracking callback here
    stages = list(stages or STAGES)
    check_order(config, stages)
    if config.torch_threads:
        # Intra-op threads for this process. On a small machine shared with the ranking workers, one
        # thread avoids oversubscription (measured: 2 threads ran a tiny model's step 4-20x slower
        # while a worker was busy).
        import torch

        torch.set_num_threads(config.torch_threads)
    hooks = Hooks(log or _ignore, log_table or _ignore, log_files or _ignore)
    barrier = _Barrier()
    run = RunDir.for_config(config)
    barrier.on_main(lambda: write_text(run.root / "config.yaml",
                                       yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)))
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
        if redo:
            barrier.on_main(lambda: run.reset(stage))
        stop_if_requested(stage, 0, None, run.root)  # a stop that arrived in a stage without step checks
        logger.info("%s: starting", stage)
        seed_everything(config.seed)
        started = time.perf_counter()
        if stage in INFERENCE_STAGES and barrier.world > 1:
            summary = _whole(lambda: STAGE_FUNCS[stage](config, run, resume, hooks, barrier))
        else:
            summary = STAGE_FUNCS[stage](config, run, resume, hooks, barrier)
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
