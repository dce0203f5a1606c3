"""The PPO stage: maximise R(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)), R the STR reward model (or, for
str_direct, the answer's TextRank centrality standardised within its prompt's group: train/rl/group_reward.py).

Read it top to bottom: :func:`ppo_step` is one iteration, :func:`ppo_update` its optimisation, and
:func:`train_ppo` the loop around them. The maths is in ``train/rl/ppo_math.py``, rollouts in
``train/rl/rollout.py``, a run's set-up, checkpoint and final save in ``train/rl/ppo_run.py``, the online
RM in ``train/rl/online_rm.py``; each trick is named in a comment where it happens. (A little over 400
lines on purpose: the loop, the step and the update read top to bottom in one file, as in CleanRL.)

Models: the actor (the SFT causal LM), a frozen reference copy of it (or, with ``ppo.policy: lora``, the
actor with its adapters switched off), the frozen reward model, and a critic initialised from the reward
model. The str_direct variant has no reward model: each step ranks every prompt's answers against each
other instead (``train/rl/group_reward.py``) and its critic starts from the SFT backbone. One step:

1. take ``batch_size`` prompts (the GLOBAL batch) in a seeded order (the position is checkpointed);
2. roll out ``samples_per_prompt`` answers per prompt, each process its contiguous share, and gather the
   shares so every process holds the whole batch;
3. shape the reward (missing-EOS penalty, per-token KL penalty, optional whitening), GAE, advantage
   whitening, all over the whole batch;
4. ``ppo_epochs`` x ``minibatches`` updates of actor (clipped ratio) and critic (clipped value loss);
5. log, hand the rollout groups to the ranking pool, refresh the RM (online variant), checkpoint.

Distributed (``accelerate launch``: DDP or DeepSpeed ZeRO-2/3). The run follows one process's
trajectory up to float summation order, whatever the number of processes: answers are seeded by their
place in the global batch; rollout tensors are all-gathered, so whitening, GAE, the KL controller and
the logged metrics see the same global batch everywhere; every minibatch is the same global set of
episodes, cut contiguously across processes, and its loss is this process's token sum over the GLOBAL
token count. Actor and critic are ONE prepared module (``PolicyAndValue``) with ONE optimizer of two
parameter groups (accelerate makes one DeepSpeed engine per job; AdamW is per parameter, so this equals
two optimizers). Reference and reward models go through ``prepare_frozen`` (ZeRO-3 inference engines
under ZeRO-3, optionally offloaded); generation under ZeRO-3 gathers the actor's weights.

Gradient clipping: actor and critic are clipped separately to ``max_grad_norm`` (0 = off), except under
DeepSpeed, whose engine clips the whole module with one norm. A checkpoint holds everything the next
step depends on (weights, optimizer, KL controller, RNG states, data position), so ``resume=True``
continues exactly: on any number of processes, or under DeepSpeed on the same layout (its partitioned
optimizer state is part of the checkpoint; ``train/dist/engine_state.py``). The learning rate follows
``ppo.lr_schedule``, a function of the step.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import time
from pathlib import Path
from typing import Callable

import torch

from selfrank.atomic import write_jsonl
from selfrank.errors import UserError
from selfrank.jsonl import read_appended_rows
from selfrank.ranking.engine import stable_seed
from selfrank.train import dist
from selfrank.train.config import DIRECT_GROUP_ERROR, DIRECT_MIN_GROUP, VARIANTS, ExperimentConfig, PPOConfig
from selfrank.train.data.ppo_prompts import ppo_prompts
from selfrank.train.dist.ranking_service import ranking_pool
from selfrank.train.rl.ppo_math import (
    apply_missing_eos_penalty,
    compute_rewards,
    gae,
    logprobs_from_logits,
    masked_whiten,
    per_token_kl,
    policy_loss_terms,
    value_loss_terms,
)
from selfrank.train.rl.ppo_run import PPORun, finish_run, start_run
from selfrank.train.rl.rollout import (
    Rollout,
    collect_rollout,
    gather_rollout,
    minibatch,
    response_forward,
    row_seeds,
)
from selfrank.train.progress import StepProgress
from selfrank.train.rundir import RunDir
from selfrank.train.signals import stop_if_requested
from selfrank.train.stages.context import StageContext
from selfrank.train.stages.variants import per_variant

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


class NonFiniteError(RuntimeError):
    """PPO met NaN/inf with ``ppo.nan_policy: stop``; a checkpoint was written before raising."""


class _NonFiniteStep(Exception):
    """A step found NaN/inf in ``what``; ``ppo.nan_policy`` decides (every process sees the same global
    values, so all raise together)."""

    def __init__(self, what: str, next_cursor: int):
        super().__init__(what)
        self.what, self.next_cursor = what, next_cursor


# ---- one iteration -------------------------------------------------------------------------------
def ppo_step(run: PPORun, step: int) -> dict:
    """One PPO iteration (1-based ``step``); returns its log row. Collective under a launcher."""
    cfg, acc, progress = run.cfg, run.acc, run.progress
    tick = time.perf_counter()
    picked, next_cursor = prompt_indices(len(run.prompts), progress.cursor, cfg.batch_size, run.config.seed)
    batch_prompts = [run.prompts[i] for i in picked]
    lo, hi = dist.shard_bounds(cfg.batch_size, acc.process_index, acc.num_processes)
    local = collect_rollout(run.model, run.ref, run.rm_run, run.tokenizer, batch_prompts[lo:hi], cfg,
                            row_seeds(run.config.seed, step, lo, hi, cfg.samples_per_prompt), acc)
    ro = gather_rollout(local, acc, run.tokenizer.pad_token_id)
    del local
    if run.group_reward is not None:
        # No reward model (str_direct): each prompt's answers are ranked against each other; the reward
        # is an answer's TextRank centrality standardised within its group (train/rl/group_reward.py).
        ro.raw_score, ro.score = run.group_reward(batch_prompts, ro.texts, cfg.samples_per_prompt, acc)
    if run.ranking_pool is not None:
        _rank_rollout_groups(run, step, batch_prompts, lo, hi, ro)

    with torch.no_grad():
        # Trick: missing-EOS penalty on answers cut at max_new_tokens.
        scores = apply_missing_eos_penalty(ro.score, ro.ended, cfg.missing_eos_penalty)
        if not _finite(scores):
            raise _NonFiniteStep("reward-model scores" if run.group_reward is None else "ranking rewards",
                                 next_cursor)
        # Per-token KL penalty to the reference (k1 = log pi - log pi_ref), score on the last token.
        kl = per_token_kl(ro.logp, ro.ref_logp) * ro.mask
        kl_coef = run.kl_ctl.value
        rewards = compute_rewards(scores, ro.logp, ro.ref_logp, ro.mask, kl_coef)
        if cfg.whiten_rewards:
            # Trick: reward whitening keeps the mean (shift_mean=False) so its sign survives.
            rewards = masked_whiten(rewards, ro.mask, shift_mean=False) * ro.mask
        # GAE with gamma 1, lambda 0.95 over the response tokens.
        advantages, returns = gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
        # Trick: advantage whitening over the whole (global) batch.
        advantages = masked_whiten(advantages, ro.mask) * ro.mask
        if not _finite(advantages, returns):
            raise _NonFiniteStep("advantages", next_cursor)

    generator = torch.Generator().manual_seed(stable_seed("ppo-minibatch", run.config.seed, step))
    lr_factor = run.set_learning_rate(step)
    stats = ppo_update(run.model, run.optimizer, ro, advantages, returns, cfg, generator, acc)
    if stats is None:
        raise _NonFiniteStep("loss or gradient", next_cursor)

    progress.cursor = next_cursor
    progress.episodes += run.episodes_per_step
    sequence_kl = kl.sum(1)
    run.kl_ctl.update(float(sequence_kl.mean()), run.episodes_per_step)
    elapsed = time.perf_counter() - tick
    row = {
        "step": step,
        "episodes": progress.episodes,
        "objective/kl": float(sequence_kl.mean()),
        # The same KL with the k3 estimator: never negative per token, lower variance (see per_token_kl).
        "objective/kl_k3": float((per_token_kl(ro.logp, ro.ref_logp, "k3") * ro.mask).sum(1).mean()),
        "objective/kl_coef": kl_coef,
        "objective/entropy": ro.mean_entropy,
        "reward/mean": float(ro.score.mean()),
        "reward/std": float(ro.score.std()) if ro.score.numel() > 1 else 0.0,
        "reward/raw_mean": float(ro.raw_score.mean()),
        "reward/penalized_mean": float(scores.mean()),
        "objective/rlhf_reward": float((scores - kl_coef * sequence_kl).mean()),
        "eos/ended_frac": float(ro.ended.float().mean()),
        "response/length": float(ro.mask.sum(1).float().mean()),
        **stats,
        "lr/actor": cfg.lr * lr_factor,
        "time/step_s": elapsed,
        "tokens/s": float(ro.mask.sum()) / max(elapsed, 1e-9),
    }
    if run.group_reward is not None:
        # Groups whose answers were all equally central (e.g. identical): they gave no signal.
        row["reward/flat_groups"] = float((ro.score.view(-1, cfg.samples_per_prompt) == 0).all(1).float().mean())
    if run.ranking_pool is not None:
        pool_stats = run.ranking_pool.stats()
        row["ranking/queue_depth"] = pool_stats.get("queue_depth")
        row["ranking/latency_s"] = pool_stats.get("latency_mean_s")
        row["ranking/dropped_groups"] = run.dropped_groups
    if run.refresher is not None and step % cfg.online_rm_every == 0:
        refresh_gen = torch.Generator().manual_seed(stable_seed("ppo-online-rm", run.config.seed, step))
        row.update(run.refresher.refresh(step, refresh_gen, acc))
    return row


def _rank_rollout_groups(run: PPORun, step: int, batch_prompts: list[str], lo: int, hi: int, ro: Rollout) -> None:
    """Hand this process's groups (the K answers of each of its prompts) to the ranking pool; never waits.
    The online variant's refresher takes whatever has been ranked so far."""
    k = run.cfg.samples_per_prompt
    for i, prompt in enumerate(batch_prompts[lo:hi], start=lo):
        try:
            run.ranking_pool.submit(f"ppo-{step}-{i}", prompt, ro.texts[i * k:(i + 1) * k], policy_version=step,
                                    block=False)
        except queue.Full:
            run.dropped_groups += 1  # the pool is behind: drop the group rather than wait
    results = run.ranking_pool.poll()
    if run.refresher is not None:
        run.refresher.take(results)


# ---- the update ----------------------------------------------------------------------------------
def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


_STAT_KEYS = ("loss/policy", "loss/value", "policy/clipfrac", "value/clipfrac", "policy/approxkl", "policy/ratio")


def _clip_norm(params, max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0 = off: only the norm is measured, for the finiteness check)."""
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm if max_norm > 0 else math.inf)


def ppo_update(model, optimizer, ro: Rollout, advantages: torch.Tensor, returns: torch.Tensor, cfg: PPOConfig,
               generator: torch.Generator, accelerator=None, separate: bool | None = None) -> dict | None:
    """``ppo_epochs`` passes over the global batch ``ro`` in ``minibatches`` shuffled minibatches.

    Every process draws the same global shuffle and trains on its contiguous share of each minibatch;
    the loss is this share's token sum over the minibatch's GLOBAL token count (``global_mean_loss``),
    so the update is that of one process over the whole minibatch. Returns mean statistics (global), or
    ``None`` when a loss or gradient norm was NaN/inf on any process: the offending minibatch is not
    applied and the remaining ones are skipped (earlier, finite updates stay). ``separate``: actor and
    critic in separate passes (None: whenever they can be, see below). Collective."""
    acc = accelerator if accelerator is not None else dist.get_accelerator()
    deepspeed = dist.uses_deepspeed(acc)
    inner = dist.unwrap(model, acc)
    # Trick (memory): in one process without DeepSpeed, the actor's forward and backward run before the
    # critic's, so only one network's activations are held at a time (about a third less peak memory on
    # SmolLM2). The two losses touch disjoint parameters, so the summed gradients are the same. DDP and a
    # DeepSpeed engine expect one forward and one backward of the wrapped module per step: one pass there.
    can_separate = acc.num_processes == 1 and not deepspeed
    if separate and not can_separate:
        raise ValueError("separate actor and critic passes need one process without DeepSpeed")
    separate = can_separate if separate is None else separate

    def poisoned(loss: torch.Tensor) -> bool:  # a collective: every process agrees, so none goes on alone
        return float(dist.reduce_sum(float(not _finite(loss)), acc)) > 0

    n = ro.input_ids.shape[0]
    size = n // cfg.minibatches
    lo, hi = dist.shard_bounds(size, acc.process_index, acc.num_processes)
    # Per minibatch: this process's sums of the five statistics, and its token count.
    sums = []
    for _ in range(cfg.ppo_epochs):
        # Trick: a fresh shuffle every epoch; the generator is seeded per step, so resuming repeats it.
        order = torch.randperm(n, generator=generator).to(ro.input_ids.device)
        for start in range(0, n, size):
            mb = minibatch(ro, order[start:start + size][lo:hi], advantages, returns)
            mask = mb.mask.float()
            count = mask.sum()
            optimizer.zero_grad(set_to_none=True)
            # Actor: clipped surrogate on the ratio of new to sampling-time probabilities.
            logits, new_values = response_forward(model, mb.input_ids, mb.attention_mask, mb.response_length,
                                                  policy_only=separate)
            new_logp = logprobs_from_logits(logits, mb.response_ids, cfg.temperature)
            del logits
            pg, pg_clipped, half_sq = policy_loss_terms(new_logp, mb.logp, mb.advantages, cfg.clip_range)
            pg_sum = (pg * mask).sum()
            if separate:
                if poisoned(pg_sum):
                    return None
                acc.backward(dist.global_mean_loss(pg_sum, count, acc))
                _, new_values = response_forward(model, mb.input_ids, mb.attention_mask, mb.response_length,
                                                 values_only=True)
            # Critic: clipped value loss around the values the advantages were computed with.
            vf, vf_clipped = value_loss_terms(new_values, mb.values, mb.returns, cfg.value_clip)
            vf_sum = (vf * mask).sum()
            loss_sum = cfg.vf_coef * vf_sum if separate else pg_sum + cfg.vf_coef * vf_sum
            if poisoned(loss_sum):
                optimizer.zero_grad(set_to_none=True)  # the separate actor pass's gradients, if any
                return None
            acc.backward(dist.global_mean_loss(loss_sum, count, acc))
            if not deepspeed:
                # Trick: global gradient-norm clipping, per network; a non-finite norm means a poisoned
                # step. The gradients are already averaged over processes, so all see the same norms.
                acc.unscale_gradients()  # fp16's gradient scaler (a no-op otherwise): clip true gradients
                actor_norm = _clip_norm(inner.policy.parameters(), cfg.max_grad_norm)
                critic_norm = _clip_norm(inner.value.parameters(), cfg.max_grad_norm)
                if not _finite(actor_norm, critic_norm) and getattr(acc, "scaler", None) is None:
                    optimizer.zero_grad(set_to_none=True)
                    return None
                # Under fp16 an overflow is the scaler's: its step skips the update and lowers the scale.
            optimizer.step()  # under DeepSpeed the engine stepped (and clipped) in ``backward``

            with torch.no_grad():
                ratio = torch.exp(new_logp.detach() - mb.logp)  # logged as TRL's val/ratio
                sums.append(torch.stack([pg_sum.detach(), vf_sum.detach(), (pg_clipped * mask).sum(),
                                         (vf_clipped * mask).sum(), (half_sq * mask).sum(),
                                         (ratio * mask).sum(), count]).double())
    optimizer.zero_grad(set_to_none=True)
    totals = dist.reduce_sum(torch.stack(sums), acc)
    means = totals[:, :-1] / totals[:, -1:].clamp_min(1.0)  # each minibatch's global token means
    return {key: float(value) for key, value in zip(_STAT_KEYS, means.mean(0))}


# ---- data order ----------------------------------------------------------------------------------
def prompt_indices(n_prompts: int, cursor: int, size: int, seed: int) -> tuple[list[int], int]:
    """The next ``size`` prompt indices from position ``cursor`` of an endless sequence of seeded
    shuffles (one per epoch over the prompts) and the new cursor. A function of its arguments only."""
    picked: list[int] = []
    while len(picked) < size:
        epoch, position = divmod(cursor, n_prompts)
        generator = torch.Generator().manual_seed(stable_seed("ppo-prompts", seed, epoch))
        order = torch.randperm(n_prompts, generator=generator).tolist()
        take = order[position:position + size - len(picked)]
        picked.extend(take)
        cursor += len(take)
    return picked, cursor


# ---- the loop ------------------------------------------------------------------------------------
def train_ppo(config: ExperimentConfig, prompts: list[str], actor_folder: Path, rm_folder: Path | None,
              out_folder: Path, *, resume: bool = False, ranking_pool=None, online_rm: bool = False,
              log_step: Callable[[dict, int], None] | None = None) -> dict:
    """Run PPO; write ``actor/``, ``critic/``, ``checkpoint/`` and ``log.jsonl`` under ``out_folder``.

    ``rm_folder`` None: no reward model (the str_direct variant): every step ranks each prompt's
    ``samples_per_prompt`` answers against each other (``config.ranking``) and rewards each answer with
    its TextRank centrality standardised within the group.

    ``ranking_pool`` (optional; under a launcher each process's handle on its node's pool) receives
    every step's rollout groups asynchronously, each process submitting the groups of its own prompts;
    with ``online_rm`` the RM is refreshed every ``ppo.online_rm_every`` steps from the ranked groups
    of all processes. ``log_step(row, step)`` receives each step's log row. Collective under a
    launcher: every process calls it with the same arguments; only the main process writes. Returns the
    stage summary (on every process)."""
    cfg = config.ppo
    if not prompts:
        raise UserError("ppo: no training prompts (task.train is empty)")
    if online_rm and ranking_pool is None:
        raise ValueError("online_rm needs a ranking_pool")
    if online_rm and cfg.online_rm_every < 1:
        raise UserError("ppo.online_rm_every: must be >= 1 for the online reward-model variant")
    if online_rm and rm_folder is None:
        raise ValueError("online_rm needs a reward model to refresh")
    if rm_folder is None and cfg.samples_per_prompt < DIRECT_MIN_GROUP:
        raise UserError(DIRECT_GROUP_ERROR.format(cfg.samples_per_prompt))
    check_layout(cfg, dist.world_size())
    out_folder = Path(out_folder)
    run = start_run(config, prompts, Path(actor_folder), None if rm_folder is None else Path(rm_folder), out_folder,
                    resume, ranking_pool, online_rm)
    acc, progress = run.acc, run.progress
    main = acc.is_main_process
    log_path = out_folder / LOG_FILE
    dist.save_on_main(lambda: _restart_log(log_path, progress.step), acc)

    started = time.perf_counter()
    last: dict = {}
    bar = StepProgress(f"ppo {out_folder.name}", cfg.steps, initial=progress.step, enabled=main)
    log_file = open(log_path, "a", encoding="utf-8") if main else None

    def write_log(row: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

    def save_checkpoint_now() -> None:
        nonlocal started
        progress.seconds += time.perf_counter() - started
        started = time.perf_counter()
        run.save_checkpoint()

    try:
        for step_index in bar:
            # Preemption (SIGTERM/SIGUSR1): checkpoint the completed steps, then stop for a requeue.
            stop_if_requested("ppo", step_index, save_checkpoint_now, run.checkpoint)
            step = step_index + 1
            try:
                row = ppo_step(run, step)
            except _NonFiniteStep as bad:
                row = None
                progress.skipped += 1
                if cfg.nan_policy == "stop":
                    # The checkpoint is the state before this step: a resumed run retries the same batch.
                    save_checkpoint_now()
                    raise NonFiniteError(f"ppo step {step}: non-finite {bad.what}; stopped (ppo.nan_policy: stop) "
                                         f"with a checkpoint in {run.checkpoint}") from None
                # Skipping consumes the batch: the next step takes the next prompts.
                progress.cursor = bad.next_cursor
                progress.episodes += run.episodes_per_step
                if main:
                    log.warning("ppo step %d: non-finite %s; step skipped (%d so far)", step, bad.what,
                                progress.skipped)
                write_log({"step": step, "skipped": bad.what, "skipped_total": progress.skipped})
            progress.step = step
            if row is not None:
                write_log(row)
                if log_step is not None:
                    log_step(row, step)
                last = row
                bar.set_postfix(reward=f"{row['reward/mean']:.3f}", kl=f"{row['objective/kl']:.3f}")
            if step % cfg.save_every == 0 and step < cfg.steps:
                save_checkpoint_now()
    finally:
        if log_file is not None:
            log_file.close()
    bar.close()
    save_checkpoint_now()
    return finish_run(run, out_folder, last)


def check_layout(cfg: PPOConfig, world: int) -> None:
    """The global batch and each minibatch must split evenly across processes (each episode once)."""
    if cfg.batch_size % world:
        raise UserError(f"ppo.batch_size: {cfg.batch_size} prompts cannot be split evenly across {world} "
                        f"processes; use a multiple of {world}")
    minibatch = cfg.batch_size * cfg.samples_per_prompt // cfg.minibatches
    if minibatch % world:
        raise UserError(f"ppo.minibatches: minibatches of {minibatch} episodes cannot be split evenly across "
                        f"{world} processes; batch_size * samples_per_prompt / minibatches must be a multiple "
                        f"of {world}")


def _restart_log(path: Path, keep_until_step: int) -> None:
    """Keep the log lines of the steps the checkpoint holds, drop later ones (they will be redone)."""
    rows = ([row for row in read_appended_rows(path) if row.get("step", math.inf) <= keep_until_step]
            if keep_until_step > 0 else [])
    write_jsonl(path, rows)


def run(config: ExperimentConfig, run: RunDir, resume: bool, ctx: StageContext) -> dict:
    """The PPO stage: one policy per STR variant (``ppo/<variant>/``), each against its own reward model
    (str_direct: none, it ranks each rollout group itself). Collective: the online variant ranks its
    rollouts through the node's pool."""
    sft_model = run.require("sft") / "model"
    prompts = ppo_prompts(config, sft_model)  # ppo.prompts when set, else the task's training prompts

    def train_one(variant: str, stage: str) -> dict:
        rm_folder = run.require(f"reward/{variant}") / "model" if VARIANTS[variant].needs_reward_model else None
        log_step = ctx.hooks.stage_log("ppo", f"{variant}/")
        if not VARIANTS[variant].online_rm:
            return train_ppo(config, prompts, sft_model, rm_folder, run.stage(stage), resume=resume,
                             log_step=log_step)
        with ranking_pool(config.ranking, config.sample.workers, group=ctx.barrier.group, wait=ctx.barrier.wait,
                          ready=True) as pool:
            return train_ppo(config, prompts, sft_model, rm_folder, run.stage(stage), resume=resume,
                             ranking_pool=pool, online_rm=True, log_step=log_step)

    return per_variant(config, run, "ppo", train_one)
