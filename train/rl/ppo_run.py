"""One PPO run's state, set-up and save: the prepared models, optimizer, KL controller and progress
(:class:`PPORun`), how a run starts or resumes (:func:`start_run`), how it checkpoints, and how it
saves its actor and critic (:func:`finish_run`). The loop itself is ``train/stages/ppo.py``."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfrank.errors import UserError
from selfrank.train import dist
from selfrank.train.checkpoint import (
    check_fingerprint,
    discard_checkpoint,
    find_checkpoint,
    load_checkpoint,
    load_optimizers,
    read_state,
    save_checkpoint,
)
from selfrank.train.config import ExperimentConfig, PPOConfig
from selfrank.train.dist.stage_setup import begin_training, end_training, stage_cost
from selfrank.train.models.causal_lm import load_model, save_model
from selfrank.train.models.peft_methods import AdapterDisabled, with_lora
from selfrank.train.models.policy_value import PolicyAndValue
from selfrank.train.models.reward_model import RewardModel, disable_dropout
from selfrank.train.models.value_model import ValueModel
from selfrank.train.optim import adamw_groups, lr_factor, set_learning_rates
from selfrank.train.rl.group_reward import GroupRankingReward
from selfrank.train.rl.online_rm import OnlineRewardRefresher
from selfrank.train.rl.ppo_math import AdaptiveKLController, FixedKLController
from selfrank.train.scale import apply_model_switches

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
ENGINE = "policy_value"  # actor + critic's optimizer state in a checkpoint (optim.pt, or deepspeed/policy_value/)
# Settings that may change between an interrupted run and its resumption (the rest must not).
_RESUMABLE_CHANGES = ("steps", "save_every", "nan_policy", "gather_for_generation", "offload_reference",
                      "offload_reward", "sampler")


@dataclass
class _Progress:
    step: int = 0  # completed steps
    cursor: int = 0  # prompts consumed
    episodes: int = 0
    skipped: int = 0
    seconds: float = 0.0  # training time before this process (resumed runs)


@dataclass
class PPORun:
    """What one PPO run holds: its prepared models, optimizer, KL controller and progress."""
    config: ExperimentConfig
    prompts: list[str]
    acc: Any  # the Accelerator
    model: torch.nn.Module  # prepared PolicyAndValue (actor + critic)
    optimizer: Any
    ref: torch.nn.Module  # prepared frozen reference (or the LoRA actor with adapters off)
    rm: RewardModel | None  # the plain reward model (trained in place by the online refresher); None: str_direct
    rm_run: torch.nn.Module | None  # the reward model as scored from (prepared unless online)
    tokenizer: Any
    kl_ctl: Any
    checkpoint: Path
    fingerprint: dict
    progress: _Progress
    refresher: OnlineRewardRefresher | None = None
    ranking_pool: Any = None
    dropped_groups: int = 0  # rollout groups the full ranking pool could not take
    group_reward: GroupRankingReward | None = None  # no reward model: rewards from ranking each group

    @property
    def cfg(self) -> PPOConfig:
        return self.config.ppo

    @property
    def episodes_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.samples_per_prompt

    def save_checkpoint(self) -> None:
        """Collective: a DeepSpeed engine's partitions are written by every process, the full weights
        gathered under ZeRO-3; the main process writes the rest and swaps the checkpoint in."""
        deepspeed = dist.uses_deepspeed(self.acc)
        staged = dist.stage_engine_states(self.checkpoint, {ENGINE: self.model}, self.acc) if deepspeed else None
        optimizers = {} if deepspeed else {ENGINE: self.optimizer}
        if self.refresher is not None:
            optimizers["reward_model"] = self.refresher.optimizer
        online_rm = self.rm if self.refresher is not None else None
        dist.save_full(self.model, self.acc, lambda inner: _save_ppo_checkpoint(
            self.checkpoint, inner.policy, inner.value, online_rm, optimizers, self.kl_ctl, self.progress,
            self.fingerprint, staged))

    def set_learning_rate(self, step: int) -> float:
        """Actor and critic learning rates for 1-based PPO step ``step`` (``ppo.lr_schedule``); returns
        the factor applied to ``ppo.lr`` / ``ppo.critic_lr``."""
        factor = lr_factor(step, self.cfg.steps, self.cfg.lr_schedule, self.cfg.warmup_steps)
        set_learning_rates(self.optimizer, [self.cfg.lr, self.cfg.critic_lr], factor)
        return factor


def start_run(config: ExperimentConfig, prompts: list[str], actor_folder: Path, rm_folder: Path | None,
              out_folder: Path, resume: bool, ranking_pool, online_rm: bool) -> PPORun:
    """Load and prepare the models, and resume from the checkpoint when asked. ``rm_folder`` None: no
    reward model (str_direct); the rewards come from ranking each rollout group (``GroupRankingReward``)."""
    cfg = config.ppo
    per_process = cfg.batch_size * cfg.samples_per_prompt // cfg.minibatches // dist.world_size()
    acc = begin_training(1, per_process, config.model.mixed_precision)  # one optimizer step per minibatch
    deepspeed = dist.uses_deepspeed(acc)
    if acc.is_main_process:
        out_folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    lora = cfg.policy == "lora"
    with dist.whole_weights(acc):
        actor, tokenizer = load_model(actor_folder, config.model)
        # A LoRA actor's reference is the actor with its adapters off: no second copy to hold.
        ref = None if lora else load_model(actor_folder, config.model)[0]
        if rm_folder is not None:
            rm = RewardModel.from_pretrained(rm_folder, config.model)
            _check_same_tokenizer(tokenizer, rm, rm_folder)
            critic = ValueModel.from_reward_model(rm)
        else:
            # No reward model to start the critic from: the SFT backbone with a fresh small head (values
            # start near 0, the mean of rewards standardised within each group).
            rm = None
            critic = ValueModel.from_reward_model(RewardModel.from_causal_lm(actor_folder, model_cfg=config.model))
    # Trick: dropout off everywhere, so log-probs and values are the same functions in rollout and update.
    for model in (actor, ref, critic):
        if model is not None:
            disable_dropout(model)
    if lora:
        actor = with_lora(actor, cfg.lora_r, cfg.lora_alpha, field="ppo.policy")
    for model in (actor, critic):
        apply_model_switches(model, config.model)  # the trained networks (the frozen ones only read)
    if online_rm:
        # Trained in place by the refresher (weights broadcast to every process), so not a frozen engine.
        rm.to(acc.device).eval().requires_grad_(False)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    fingerprint = _fingerprint(config, len(prompts), online_rm, direct=rm is None)
    checkpoint = out_folder / CHECKPOINT

    progress = _Progress()
    if resume and find_checkpoint(checkpoint) is not None:
        progress = _load_ppo_checkpoint(checkpoint, actor, critic, rm if online_rm else None, kl_ctl, fingerprint)
        log.info("ppo: resuming after step %d of %d (%s)", progress.step, cfg.steps, checkpoint)
    elif find_checkpoint(checkpoint) is not None:
        log.info("ppo: discarding the old checkpoint %s (not resuming)", checkpoint)
        dist.save_on_main(lambda: discard_checkpoint(checkpoint), acc)

    # Actor and critic: one module, one optimizer (actor lr, critic lr), one DDP wrapper / DeepSpeed engine.
    policy_value = PolicyAndValue(actor, critic).to(acc.device).train()
    optimizer = adamw_groups([(actor, cfg.lr), (critic, cfg.critic_lr)], fused=not deepspeed)
    model, optimizer = dist.prepare_trainable(acc, policy_value, optimizer, micro_batch_size=per_process,
                                              max_grad_norm=cfg.max_grad_norm)
    # The LoRA view calls the actor inside its engine (ZeRO-3 gathers its shards as for any forward), under
    # the job's autocast as the trained forward is.
    ref = (dist.autocast_forward(AdapterDisabled(actor), acc) if lora
           else dist.prepare_frozen(ref, acc, offload=cfg.offload_reference))
    if rm is None:
        rm_run = None
    else:
        rm_run = (dist.autocast_forward(rm, acc) if online_rm
                  else dist.prepare_frozen(rm, acc, offload=cfg.offload_reward))
    group_reward = GroupRankingReward(config.ranking, seed=config.seed) if rm is None else None
    refresher = OnlineRewardRefresher(rm, rm.tokenizer or tokenizer, config) if online_rm else None
    if progress.step > 0:
        # A torch optimizer's state is in optim.pt; a DeepSpeed engine's partitions in deepspeed/.
        optimizers = {} if deepspeed else {ENGINE: optimizer}
        if refresher is not None:
            optimizers["reward_model"] = refresher.optimizer
        load_optimizers(checkpoint, optimizers)
        if deepspeed:
            dist.load_engine_states(checkpoint, {ENGINE: model}, acc)
    return PPORun(config=config, prompts=prompts, acc=acc, model=model, optimizer=optimizer, ref=ref, rm=rm,
                  rm_run=rm_run, tokenizer=tokenizer, kl_ctl=kl_ctl, checkpoint=checkpoint, fingerprint=fingerprint,
                  progress=progress, refresher=refresher, ranking_pool=ranking_pool, group_reward=group_reward)


def finish_run(run: PPORun, out_folder: Path, last: dict) -> dict:
    """Save the actor and critic (and the online RM) as plain folders; the stage summary."""
    acc, progress = run.acc, run.progress

    def save_final(inner: PolicyAndValue) -> None:
        save_model(inner.policy, run.tokenizer, out_folder / "actor")
        inner.value.save_pretrained(out_folder / "critic")
        if run.refresher is not None:
            run.rm.save_pretrained(out_folder / "reward_model")

    dist.save_full(run.model, acc, save_final)
    summary = {
        "steps": progress.step,
        "episodes": progress.episodes,
        "seconds": round(progress.seconds, 3),
        "episodes_per_s": progress.episodes / progress.seconds if progress.seconds > 0 else None,
        "final_reward_mean": last.get("reward/mean"),
        "final_kl": last.get("objective/kl"),
        "skipped_steps": progress.skipped,
        "actor": str(out_folder / "actor"),
        **stage_cost(progress.seconds, acc.num_processes),
        **_peak_memory(acc),
    }
    if run.ranking_pool is not None:
        summary["ranking_dropped_groups"] = run.dropped_groups
    if run.refresher is not None:
        summary["online_rm"] = {"dropped_stale": run.refresher.dropped_stale, "failed_groups": run.refresher.failed}
    end_training(acc)
    log.info("ppo: %d steps, %d episodes in %.1fs, final reward %s, KL %s, %d skipped", summary["steps"],
             summary["episodes"], progress.seconds, summary["final_reward_mean"], summary["final_kl"],
             progress.skipped)
    return summary


def _check_same_tokenizer(tokenizer, rm: RewardModel, rm_folder: Path) -> None:
    other = rm.tokenizer
    if other is None:
        return
    if (len(other) != len(tokenizer) or other.pad_token_id != tokenizer.pad_token_id
            or other.eos_token_id != tokenizer.eos_token_id or other.get_vocab() != tokenizer.get_vocab()):
        raise UserError(f"{rm_folder}: the reward model's tokenizer differs from the actor's; PPO scores the "
                        "actor's token ids directly, so both must share one tokenizer")


def _peak_memory(accelerator) -> dict:
    """``peak_gpu_memory_bytes``: the largest ``max_memory_allocated`` over processes (CUDA only)."""
    if not torch.cuda.is_available():
        return {}
    peak = torch.tensor([float(torch.cuda.max_memory_allocated())], device=accelerator.device)
    return {"peak_gpu_memory_bytes": int(accelerator.gather(peak).max())}


def _fingerprint(config: ExperimentConfig, n_prompts: int, online_rm: bool, direct: bool = False) -> dict:
    # A decaying learning-rate schedule spans ``steps``: then the number of steps cannot change on resume.
    resumable = _RESUMABLE_CHANGES if config.ppo.lr_schedule == "constant" else tuple(
        name for name in _RESUMABLE_CHANGES if name != "steps")
    ppo = {k: v for k, v in vars(config.ppo).items() if k not in resumable}
    # (The reward source is named only when it is not a reward model, so earlier checkpoints still match.)
    return {"ppo": ppo, "seed": config.seed, "prompts": n_prompts, "online_rm": online_rm,
            **({"reward_source": "group_ranking"} if direct else {})}


def _checkpoint_weights(actor, critic, rm: RewardModel | None) -> dict:
    # The online variant trains the RM itself, so it is part of the state.
    return {"actor": actor, "critic": critic, **({"reward_model": rm} if rm is not None else {})}


def _save_ppo_checkpoint(folder: Path, actor, critic, rm: RewardModel | None, optimizers: dict, kl_ctl,
                         progress: _Progress, fingerprint: dict, staged: dict | None = None) -> None:
    """Everything the next step depends on, from plain full modules (``optimizers``: name -> torch
    optimizer; ``staged``: the DeepSpeed engine's partitions, already in the staging folder)."""
    save_checkpoint(folder, models=_checkpoint_weights(actor, critic, rm), optimizers=optimizers,
                    state={**dataclasses.asdict(progress), "kl_controller": kl_ctl.state_dict(),
                           "fingerprint": fingerprint}, staged=staged)


def _load_ppo_checkpoint(folder: Path, actor, critic, rm: RewardModel | None, kl_ctl, fingerprint: dict) -> _Progress:
    """Weights into the plain modules (before ``prepare``), the KL controller and the RNG states; the
    optimizers are loaded by the caller once they are prepared (``load_optimizers``)."""
    check_fingerprint(read_state(folder) or {}, fingerprint, folder, "PPO")
    state = load_checkpoint(folder, models=_checkpoint_weights(actor, critic, rm))
    kl_ctl.load_state_dict(state["kl_controller"])
    return _Progress(**{f.name: state[f.name] for f in dataclasses.fields(_Progress)})
