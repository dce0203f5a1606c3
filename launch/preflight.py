"""Everything that can be checked before the first stage runs, checked before the first stage runs.

A mistake found after hours of SFT, sampling and reward training costs those hours; found here it
costs seconds and leaves the run folder exactly as it was. Every ``selfrank`` entry point calls
:func:`preflight` (the stage commands and ``run`` with the job's world size, ``selfrank slurm`` with
nodes x GPUs per node, ``selfrank experiment`` for every run of the grid):

* batch layouts against the world size (each check lives beside the maths it protects:
  ``train.stages.sft.check_batch_layout``, ``train.stages.ppo.check_layout``);
* the launcher's precision (``--mixed_precision``, a DeepSpeed JSON) against ``model.mixed_precision``;
* group sizes against the ranking pairs' interval (the online variant ranks PPO's own groups);
* what the run folder already holds (``train.pipeline.plan_stages``: nothing finished is replaced,
  and no checkpoint discarded, without consent);
* WordNet, when the eval stage will run (METEOR needs it);
* the task data and the model, when a stage that reads them will run (skipped by ``selfrank slurm``:
  its job may see other files than the login node, and checks them itself before its first stage).
"""
from __future__ import annotations

import logging

from selfrank.errors import UserError
from selfrank.train.config import ExperimentConfig

log = logging.getLogger(__name__)


def check_world(config: ExperimentConfig, world: int) -> None:
    """Every check that depends only on the config and the number of processes."""
    from selfrank.train.precision import check_precision_request
    from selfrank.train.stages.ppo import check_layout
    from selfrank.train.stages.sft import check_batch_layout

    if world < 1:
        raise UserError(f"world size: must be >= 1, got {world}")
    check_precision_request(config.model.mixed_precision)  # the launcher's precision vs the config's
    check_batch_layout(config.sft, world)
    check_layout(config.ppo, world)
    check_group_sizes(config)


def check_group_sizes(config: ExperimentConfig) -> None:
    """Pairs are drawn ``ranking.pairs.interval`` ranks apart inside each ranked group, so every group
    that is ranked must be larger than the interval: the sample stage's K answers, and, for the online
    variant, PPO's ``samples_per_prompt`` answers per prompt."""
    interval = config.ranking.pairs.interval
    if interval is None:
        return
    if interval >= config.sample.samples_per_prompt:
        raise UserError(f"ranking.pairs.interval: IL must be < sample.samples_per_prompt "
                        f"({config.sample.samples_per_prompt}), got {interval}")
    if "str_online" in config.variants and interval >= config.ppo.samples_per_prompt:
        raise UserError(f"ranking.pairs.interval: the online variant (str_online) ranks PPO's "
                        f"{config.ppo.samples_per_prompt} answers per prompt, so IL must be < "
                        f"ppo.samples_per_prompt; got {interval}")


def check_wordnet() -> None:
    """METEOR (a metric of every report, and the ranking study's reference) needs WordNet."""
    from selfrank.train.evaluation.metrics import require_wordnet

    require_wordnet()


def check_reachable(config: ExperimentConfig, stages: list[str]) -> None:
    """Read the task data and find the model, for the stages that read them; then the policy settings
    that depend on both (chat prompts that fit, a PEFT method the architecture supports)."""
    from selfrank.train.data.tasks import load_task
    from selfrank.train.models.causal_lm import check_model_source
    from selfrank.train.models.preflight import check_policy_settings

    data = load_task(config.task) if any(stage != "reward" for stage in stages) else None
    if "ppo" in stages and config.ppo.prompts is not None:
        from selfrank.train.data.ppo_prompts import read_prompt_file

        read_prompt_file(config.ppo.prompts, config.task)  # every row checked; rendered when PPO starts
    if "sft" in stages:
        check_model_source(config.model)
    if "reward" in stages and config.reward.model is not None:
        from selfrank.train.models.reward_interop import check_classifier_source

        check_classifier_source(config.reward.model)
    if stages:
        check_policy_settings(config, sft_todo="sft" in stages, data=data)


def preflight(config: ExperimentConfig, stages: list[str], *, world: int, resume: bool = False,
              force: bool = False, redo: bool = False, later: bool = False):
    """Run every check for ``stages`` on ``world`` processes; returns the stage plans
    (``train.pipeline.StagePlan``) of the stages in order. Raises ``UserError`` on the first problem.
    ``later``: for a job that runs later (``selfrank slurm``): its earlier stages may still be to come,
    and its files are checked where it runs."""
    from selfrank.train.pipeline import plan_stages

    check_world(config, world)
    plans = plan_stages(config, stages, resume=resume, force=force, redo=redo, prerequisites=not later)
    todo = [plan.stage for plan in plans if plan.action != "skip"]
    if "eval" in todo:
        check_wordnet()
    if not later:
        check_reachable(config, todo)
    return plans
