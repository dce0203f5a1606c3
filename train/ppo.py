"""The PPO stage: maximise R(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)) against the STR reward model.

Models: the actor (the SFT causal LM, dropout off), a frozen reference copy of it, the frozen reward
model, and a critic initialised from the reward model (``train/value_model.py``). One step:

1. take ``batch_size`` prompts in a seeded order (the position in that order is checkpointed);
2. roll out: sample ``samples_per_prompt`` answers each, then, without gradients, recompute the actor's
   and the reference's log-probs, the RM score and the critic's values (``collect_rollout``);
3. shape the reward: missing-EOS penalty, per-token KL penalty, optional reward whitening; GAE;
   advantage whitening;
4. ``ppo_epochs`` x ``minibatches`` updates of actor (clipped ratio) and critic (clipped value loss)
   with separate AdamW optimisers and gradient clipping (``ppo_update``);
5. log, hand the rollout groups to the ranking pool, refresh the RM (online variant), checkpoint.

The maths lives in ``train/ppo_math.py``; each trick is named where it is used. A checkpoint holds
everything the next step depends on (weights, optimisers, KL controller, RNG states, data position),
so ``resume=True`` continues exactly where the run stopped.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from tqdm.auto import tqdm

from ranking.atomic import write_jsonl
from ranking.engine import stable_seed
from ranking.errors import UserError

from .config import ExperimentConfig, PPOConfig
from .generation import generate
from .models import load_model, save_model
from .ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    compute_rewards,
    entropy_from_logits,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    per_token_kl,
    policy_loss,
    value_loss,
)
from .reward_model import RewardModel, atomic_folder, disable_dropout, position_ids_from_mask
from .value_model import ValueModel

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "log.jsonl"
# Settings that may change between an interrupted run and its resumption (the rest must not).
_RESUMABLE_CHANGES = ("steps", "save_every", "nan_policy")


class NonFiniteError(RuntimeError):
    """PPO met NaN/inf with ``ppo.nan_policy: stop``; a checkpoint was written before raising."""


@dataclass
class Rollout:
    """One batch of episodes, everything on the response positions ``(B, R)`` unless noted."""
    input_ids: torch.Tensor  # (B, P + R) left-padded query + right-padded response
    attention_mask: torch.Tensor  # (B, P + R)
    response_ids: torch.Tensor
    mask: torch.Tensor  # 1 on real response tokens (the EOS included)
    ended: torch.Tensor  # (B,) the answer ended with EOS
    logp: torch.Tensor  # actor log-probs at sampling time (at the sampling temperature)
    ref_logp: torch.Tensor  # reference log-probs (same temperature)
    values: torch.Tensor  # critic values of the state before each response token
    raw_score: torch.Tensor  # (B,) RM output
    score: torch.Tensor  # (B,) normalised RM score
    entropy: torch.Tensor  # () mean per-token entropy of the sampling distribution
    texts: list[str]

    @property
    def query_length(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]


# ---- forwards ------------------------------------------------------------------------------------
def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """Logits predicting each response token, ``(B, R, V)``.

    Trick (speed): the last token is never an input (nothing is predicted after it), and only the R
    positions that predict response tokens go through the LM head (``logits_to_keep``); the prompt's
    positions would cost as much vocabulary projection again for nothing. Positions come from the mask
    so that left padding does not shift them (the same position ids ``generate`` used while sampling).
    """
    input_ids, attention_mask = input_ids[:, :-1], attention_mask[:, :-1]
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                logits_to_keep=response_length)
    return out.logits


def response_values(critic: ValueModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_length: int) -> torch.Tensor:
    """Critic values of the states before each response token, ``(B, R)`` (the last token is not an input)."""
    values = critic(input_ids[:, :-1], attention_mask[:, :-1])
    return values[:, -response_length:]


@torch.no_grad()
def collect_rollout(actor, ref, rm: RewardModel, critic: ValueModel, tokenizer, prompts: list[str],
                    cfg: PPOConfig, seed: int) -> Rollout:
    """Sample and score one batch of episodes (no gradients anywhere)."""
    k = cfg.samples_per_prompt
    gen = generate(actor, tokenizer, prompts, n=k, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                   max_new_tokens=cfg.max_new_tokens, seed=seed, batch_size=len(prompts) * k)
    device = next(actor.parameters()).device
    response_ids = gen.response_ids.to(device)
    mask = gen.response_mask.to(device)
    input_ids = torch.cat([gen.query_ids.to(device), response_ids], dim=1)
    attention_mask = torch.cat([gen.query_mask.to(device), mask], dim=1)
    length = response_ids.shape[1]

    # Trick: log-probs recomputed by a plain forward at the sampling temperature (logits / T), the same
    # computation the update will repeat, so the first ratio is exactly 1 (no generate-vs-forward drift).
    logits = response_logits(actor, input_ids, attention_mask, length).float() / cfg.temperature
    logp = logprobs_from_logits(logits, response_ids)
    entropy = masked_mean(entropy_from_logits(logits), mask)
    del logits
    ref_logp = logprobs_from_logits(response_logits(ref, input_ids, attention_mask, length), response_ids,
                                    cfg.temperature)
    # The RM reads the last real token: the EOS when the answer ended, as in its training texts.
    raw = rm(input_ids, attention_mask)
    values = response_values(critic, input_ids, attention_mask, length)
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, response_ids=response_ids, mask=mask,
                   ended=gen.ended.to(device), logp=logp, ref_logp=ref_logp, values=values, raw_score=raw,
                   score=rm.normalized(raw), entropy=entropy, texts=gen.texts)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def ppo_update(actor, critic: ValueModel, actor_opt, critic_opt, ro: Rollout, advantages: torch.Tensor,
               returns: torch.Tensor, cfg: PPOConfig, generator: torch.Generator) -> dict | None:
    """``ppo_epochs`` passes over the batch in ``minibatches`` shuffled minibatches.

    Returns mean statistics, or ``None`` when a loss or gradient norm was NaN/inf: the offending
    minibatch is not applied and the remaining ones are skipped (earlier, finite updates stay)."""
    n = ro.input_ids.shape[0]
    size = n // cfg.minibatches
    length = ro.response_ids.shape[1]
    sums = {"loss/policy": 0.0, "loss/value": 0.0, "policy/clipfrac": 0.0, "value/clipfrac": 0.0,
            "policy/approxkl": 0.0}
    count = 0
    for _ in range(cfg.ppo_epochs):
        # Trick: a fresh shuffle every epoch; the generator is seeded per step, so resuming repeats it.
        order = torch.randperm(n, generator=generator).to(ro.input_ids.device)
        for start in range(0, n, size):
            idx = order[start:start + size]
            ids, attn, mask = ro.input_ids[idx], ro.attention_mask[idx], ro.mask[idx]

            # Actor: clipped surrogate on the ratio of new to sampling-time probabilities.
            logits = response_logits(actor, ids, attn, length)
            new_logp = logprobs_from_logits(logits, ro.response_ids[idx], cfg.temperature)
            pg_loss, pg_clipfrac, approx_kl = policy_loss(new_logp, ro.logp[idx], advantages[idx], mask,
                                                         cfg.clip_range)
            # Critic: clipped value loss around the values the advantages were computed with.
            new_values = response_values(critic, ids, attn, length)
            vf_loss, vf_clipfrac = value_loss(new_values, ro.values[idx], returns[idx], mask, cfg.value_clip)
            loss = pg_loss + cfg.vf_coef * vf_loss
            if not _finite(loss):
                return None

            actor_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
            loss.backward()
            # Trick: global gradient-norm clipping, per model; a non-finite norm means a poisoned step.
            actor_norm = torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.max_grad_norm)
            critic_norm = torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
            if not _finite(actor_norm, critic_norm):
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                return None
            actor_opt.step()
            critic_opt.step()

            for key, value in (("loss/policy", pg_loss), ("loss/value", vf_loss), ("policy/clipfrac", pg_clipfrac),
                               ("value/clipfrac", vf_clipfrac), ("policy/approxkl", approx_kl)):
                sums[key] += float(value.detach())
            count += 1
    return {key: value / count for key, value in sums.items()}


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


# ---- checkpoint ----------------------------------------------------------------------------------
def _fingerprint(config: ExperimentConfig, n_prompts: int, online_rm: bool) -> dict:
    ppo = {k: v for k, v in vars(config.ppo).items() if k not in _RESUMABLE_CHANGES}
    return {"ppo": ppo, "seed": config.seed, "prompts": n_prompts, "online_rm": online_rm}


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Progress:
    step: int = 0  # completed steps
    cursor: int = 0  # prompts consumed
    episodes: int = 0
    skipped: int = 0
    seconds: float = 0.0  # training time before this process (resumed runs)


def save_checkpoint(folder: Path, actor, critic, rm: RewardModel | None, optimizers: dict, kl_ctl,
                    progress: _Progress, fingerprint: dict) -> None:
    """Write everything the next step depends on to ``folder`` in one atomic rename."""
    with atomic_folder(folder) as tmp:
        save_safetensors_model(actor, str(tmp / "actor.safetensors"))
        save_safetensors_model(critic, str(tmp / "critic.safetensors"))
        if rm is not None:  # online variant: the RM itself is trained
            save_safetensors_model(rm, str(tmp / "reward_model.safetensors"))
        torch.save({
            "step": progress.step, "cursor": progress.cursor, "episodes": progress.episodes,
            "skipped": progress.skipped, "seconds": progress.seconds,
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "kl_controller": kl_ctl.state_dict(), "rng": _rng_state(),
            "fingerprint": json.dumps(fingerprint, sort_keys=True),
        }, tmp / STATE_FILE)


def load_checkpoint(folder: Path, actor, critic, rm: RewardModel | None, optimizers: dict, kl_ctl,
                    fingerprint: dict) -> _Progress:
    state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
    if state["fingerprint"] != json.dumps(fingerprint, sort_keys=True):
        raise UserError(f"{folder}: the checkpoint was made with other PPO settings or prompts; "
                        "run again without resume to start over")
    device = str(next(actor.parameters()).device)
    load_safetensors_model(actor, str(folder / "actor.safetensors"), device=device)
    load_safetensors_model(critic, str(folder / "critic.safetensors"), device=device)
    if rm is not None:
        load_safetensors_model(rm, str(folder / "reward_model.safetensors"), device=device)
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    kl_ctl.load_state_dict(state["kl_controller"])
    _set_rng_state(state["rng"])
    return _Progress(step=int(state["step"]), cursor=int(state["cursor"]), episodes=int(state["episodes"]),
                     skipped=int(state["skipped"]), seconds=float(state["seconds"]))


def _restart_log(path: Path, keep_until_step: int) -> None:
    """Keep the log lines of the steps the checkpoint holds, drop later ones (they will be redone)."""
    rows = []
    if keep_until_step > 0 and path.is_file():
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a kill
                if row.get("step", math.inf) <= keep_until_step:
                    rows.append(row)
    write_jsonl(path, rows)


# ---- online reward model -------------------------------------------------------------------------
class OnlineRewardRefresher:
    """Collects ranked rollout groups from the pool and refreshes the RM on their pairs.

    Results ranked from a policy more than ``max_staleness`` steps old are dropped: their pairs
    describe answers the current policy no longer gives."""

    def __init__(self, rm: RewardModel, tokenizer, config: ExperimentConfig, steps_per_refresh: int = 4):
        self.rm = rm
        self.tokenizer = tokenizer
        self.max_staleness = config.ppo.online_rm_max_staleness
        self.max_length = config.reward.max_length
        self.batch_size = config.reward.batch_size
        self.steps_per_refresh = steps_per_refresh
        rm.requires_grad_(True)
        self.optimizer = adamw(rm, config.reward.lr, weight_decay=0.0)
        rm.requires_grad_(False)
        self.fresh: list[tuple[int, str, str, str]] = []  # (policy_version, prompt, winner, loser)
        self.dropped_stale = 0
        self.failed = 0

    def take(self, results) -> None:
        for result in results:
            if getattr(result, "error", None) is not None:
                self.failed += 1
                continue
            ranked = result.ranked
            version = int(getattr(result, "policy_version", 0) or 0)
            for winner, loser in ranked.pairs:
                self.fresh.append((version, ranked.prompt, ranked.responses[winner], ranked.responses[loser]))

    def refresh(self, step: int, generator: torch.Generator) -> dict:
        """A few pairwise-loss steps on the fresh pairs; returns statistics for the log."""
        from .reward import _pairwise_rewards, pairwise_loss
        from .reward_model import encode_pairs

        keep = [p for p in self.fresh if step - p[0] <= self.max_staleness]
        self.dropped_stale += len(self.fresh) - len(keep)
        self.fresh = []
        stats = {"online_rm/pairs": len(keep), "online_rm/dropped_stale": self.dropped_stale}
        if not keep:
            return stats
        prompts = [p[1] for p in keep]
        winners = encode_pairs(self.tokenizer, prompts, [p[2] for p in keep], self.max_length)
        losers = encode_pairs(self.tokenizer, prompts, [p[3] for p in keep], self.max_length)
        items = [[w, l] for w, l in zip(winners, losers)]
        self.rm.train()
        self.rm.requires_grad_(True)
        losses = []
        try:
            for _ in range(self.steps_per_refresh):
                order = torch.randperm(len(items), generator=generator)[:self.batch_size].tolist()
                r_w, r_l = _pairwise_rewards(self.rm, self.tokenizer, [items[i] for i in order])
                loss = pairwise_loss(r_w, r_l)
                if not _finite(loss):
                    break
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(float(loss.detach()))
        finally:
            self.rm.eval()
            self.rm.requires_grad_(False)
        if losses:
            stats["online_rm/loss"] = float(np.mean(losses))
        return stats


# ---- the loop ------------------------------------------------------------------------------------
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def adamw(module: torch.nn.Module, lr: float, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused into one kernel when the device supports it (a few ms per step on small models)."""
    params = [p for p in module.parameters() if p.requires_grad]
    fusable = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
                  for p in params)
    return torch.optim.AdamW(params, lr=lr, fused=fusable or None, **kwargs)


def _check_same_tokenizer(tokenizer, rm: RewardModel, rm_folder: Path) -> None:
    other = rm.tokenizer
    if other is None:
        return
    if (len(other) != len(tokenizer) or other.pad_token_id != tokenizer.pad_token_id
            or other.eos_token_id != tokenizer.eos_token_id or other.get_vocab() != tokenizer.get_vocab()):
        raise UserError(f"{rm_folder}: the reward model's tokenizer differs from the actor's; PPO scores the "
                        "actor's token ids directly, so both must share one tokenizer")


def train_ppo(config: ExperimentConfig, prompts: list[str], actor_folder: Path, rm_folder: Path, out_folder: Path,
              *, resume: bool = False, ranking_pool=None, online_rm: bool = False) -> dict:
    """Run PPO; write ``actor/``, ``critic/``, ``checkpoint/`` and ``log.jsonl`` under ``out_folder``.

    ``ranking_pool`` (optional) receives every step's rollout groups asynchronously; with
    ``online_rm`` the RM is refreshed every ``ppo.online_rm_every`` steps from the ranked groups.
    Returns the stage summary."""
    cfg = config.ppo
    if not prompts:
        raise UserError("ppo: no training prompts (task.train is empty)")
    if online_rm and ranking_pool is None:
        raise ValueError("online_rm needs a ranking_pool")
    if online_rm and cfg.online_rm_every < 1:
        raise UserError("ppo.online_rm_every: must be >= 1 for the online reward-model variant")
    out_folder = Path(out_folder)
    out_folder.mkdir(parents=True, exist_ok=True)
    checkpoint = out_folder / CHECKPOINT
    log_path = out_folder / LOG_FILE
    device = _device()
    n_episodes = cfg.batch_size * cfg.samples_per_prompt

    torch.manual_seed(config.seed)
    actor, tokenizer = load_model(Path(actor_folder), config.model)
    ref, _ = load_model(Path(actor_folder), config.model)
    rm = RewardModel.from_pretrained(rm_folder, config.model)
    _check_same_tokenizer(tokenizer, rm, Path(rm_folder))
    critic = ValueModel.from_reward_model(rm)
    # Trick: dropout off everywhere, so log-probs and values are the same functions in rollout and update.
    for model in (actor, ref, critic):
        disable_dropout(model)
    actor.to(device).train()
    critic.to(device).train()
    ref.to(device).eval().requires_grad_(False)
    rm.to(device).eval().requires_grad_(False)

    # Separate optimisers: the critic's loss scale must not steer the actor's step sizes.
    actor_opt = adamw(actor, cfg.lr)
    critic_opt = adamw(critic, cfg.critic_lr)
    optimizers = {"actor": actor_opt, "critic": critic_opt}
    refresher = OnlineRewardRefresher(rm, rm.tokenizer or tokenizer, config) if online_rm else None
    if refresher is not None:
        optimizers["reward_model"] = refresher.optimizer
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    fingerprint = _fingerprint(config, len(prompts), online_rm)

    progress = _Progress()
    if resume and (checkpoint / STATE_FILE).is_file():
        progress = load_checkpoint(checkpoint, actor, critic, rm if online_rm else None, optimizers, kl_ctl,
                                   fingerprint)
        log.info("ppo: resuming after step %d of %d (%s)", progress.step, cfg.steps, checkpoint)
    elif checkpoint.exists():
        log.info("ppo: discarding the old checkpoint %s (not resuming)", checkpoint)
        shutil.rmtree(checkpoint)
    _restart_log(log_path, progress.step)

    def checkpoint_now() -> None:
        save_checkpoint(checkpoint, actor, critic, rm if online_rm else None, optimizers, kl_ctl, progress,
                        fingerprint)

    started = time.perf_counter()
    last: dict = {}
    dropped_groups = [0]  # rollout groups the full ranking pool could not take
    bar = tqdm(range(progress.step, cfg.steps), desc="ppo", initial=progress.step, total=cfg.steps,
               disable=not sys.stderr.isatty())
    with open(log_path, "a", encoding="utf-8") as log_file:

        def write_log(row: dict) -> None:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

        def non_finite(step: int, what: str, next_cursor: int) -> None:  # None: the step has no log row
            """Apply ``ppo.nan_policy`` to a NaN/inf found in ``what`` at ``step`` (1-based)."""
            progress.skipped += 1
            if cfg.nan_policy == "stop":
                # The checkpoint is the state before this step: a resumed run retries the same batch.
                checkpoint_now()
                raise NonFiniteError(f"ppo step {step}: non-finite {what}; stopped (ppo.nan_policy: stop) with "
                                     f"a checkpoint in {checkpoint}")
            # Skipping consumes the batch: the next step takes the next prompts.
            progress.cursor = next_cursor
            progress.episodes += n_episodes
            log.warning("ppo step %d: non-finite %s; step skipped (%d so far)", step, what, progress.skipped)
            write_log({"step": step, "skipped": what, "skipped_total": progress.skipped})

        def _one_step(step: int) -> dict | None:
            """One PPO iteration; returns its log row, or None when it was skipped."""
            tick = time.perf_counter()
            picked, next_cursor = prompt_indices(len(prompts), progress.cursor, cfg.batch_size, config.seed)
            batch_prompts = [prompts[i] for i in picked]
            ro = collect_rollout(actor, ref, rm, critic, tokenizer, batch_prompts, cfg,
                                 seed=stable_seed("ppo-rollout", config.seed, step) % (2**31 - 1))

            # Async ranking of this step's groups (the K answers of each prompt); never waits.
            if ranking_pool is not None:
                k = cfg.samples_per_prompt
                for i, prompt in enumerate(batch_prompts):
                    try:
                        ranking_pool.submit(f"ppo-{step}-{i}", prompt, ro.texts[i * k:(i + 1) * k],
                                            policy_version=step, block=False)
                    except queue.Full:
                        dropped_groups[0] += 1  # the pool is behind: drop the group rather than wait
                results = ranking_pool.poll()
                if refresher is not None:
                    refresher.take(results)

            with torch.no_grad():
                # Trick: missing-EOS penalty on answers cut at max_new_tokens.
                scores = apply_missing_eos_penalty(ro.score, ro.ended, cfg.missing_eos_penalty)
                if not _finite(scores):
                    return non_finite(step, "reward-model scores", next_cursor)
                # Per-token KL penalty to the reference (k1 = log pi - log pi_ref), score on the last token.
                kl = per_token_kl(ro.logp, ro.ref_logp) * ro.mask
                kl_coef = kl_ctl.value
                rewards = compute_rewards(scores, ro.logp, ro.ref_logp, ro.mask, kl_coef)
                if cfg.whiten_rewards:
                    # Trick: reward whitening keeps the mean (shift_mean=False) so its sign survives.
                    rewards = masked_whiten(rewards, ro.mask, shift_mean=False) * ro.mask
                # GAE with gamma 1, lambda 0.95 over the response tokens.
                advantages, returns = gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
                # Trick: advantage whitening per batch.
                advantages = masked_whiten(advantages, ro.mask) * ro.mask
                if not _finite(advantages, returns):
                    return non_finite(step, "advantages", next_cursor)

            generator = torch.Generator().manual_seed(stable_seed("ppo-minibatch", config.seed, step))
            stats = ppo_update(actor, critic, actor_opt, critic_opt, ro, advantages, returns, cfg, generator)
            if stats is None:
                return non_finite(step, "loss or gradient", next_cursor)

            progress.cursor = next_cursor
            progress.episodes += n_episodes
            sequence_kl = kl.sum(1)
            kl_ctl.update(float(sequence_kl.mean()), n_episodes)
            elapsed = time.perf_counter() - tick
            row = {
                "step": step,
                "episodes": progress.episodes,
                "objective/kl": float(sequence_kl.mean()),
                "objective/kl_coef": kl_coef,
                "objective/entropy": float(ro.entropy),
                "reward/mean": float(ro.score.mean()),
                "reward/std": float(ro.score.std()) if ro.score.numel() > 1 else 0.0,
                "reward/raw_mean": float(ro.raw_score.mean()),
                "reward/penalized_mean": float(scores.mean()),
                "objective/rlhf_reward": float((scores - kl_coef * sequence_kl).mean()),
                "eos/ended_frac": float(ro.ended.float().mean()),
                "response/length": float(ro.mask.sum(1).float().mean()),
                **stats,
                "time/step_s": elapsed,
                "tokens/s": float(ro.mask.sum()) / max(elapsed, 1e-9),
            }
            if ranking_pool is not None:
                pool_stats = ranking_pool.stats()
                row["ranking/queue_depth"] = pool_stats.get("queue_depth")
                row["ranking/latency_s"] = pool_stats.get("latency_mean_s")
                row["ranking/dropped_groups"] = dropped_groups[0]
            if refresher is not None and step % cfg.online_rm_every == 0:
                refresh_gen = torch.Generator().manual_seed(stable_seed("ppo-online-rm", config.seed, step))
                row.update(refresher.refresh(step, refresh_gen))
            return row

        for step_index in bar:
            step = step_index + 1
            row = _one_step(step)
            progress.step = step
            if row is not None:
                write_log(row)
                last = row
                bar.set_postfix(reward=f"{row['reward/mean']:.3f}", kl=f"{row['objective/kl']:.3f}")
            if step % cfg.save_every == 0 and step < cfg.steps:
                progress.seconds += time.perf_counter() - started
                started = time.perf_counter()
                checkpoint_now()
    bar.close()

    progress.seconds += time.perf_counter() - started
    checkpoint_now()
    save_model(actor, tokenizer, out_folder / "actor")
    critic.save_pretrained(out_folder / "critic")
    if online_rm:
        rm.save_pretrained(out_folder / "reward_model")
    summary = {
        "steps": progress.step,
        "episodes": progress.episodes,
        "seconds": round(progress.seconds, 3),
        "episodes_per_s": progress.episodes / progress.seconds if progress.seconds > 0 else None,
        "final_reward_mean": last.get("reward/mean"),
        "final_kl": last.get("objective/kl"),
        "skipped_steps": progress.skipped,
        "actor": str(out_folder / "actor"),
    }
    if ranking_pool is not None:
        summary["ranking_dropped_groups"] = dropped_groups[0]
    if refresher is not None:
        summary["online_rm"] = {"dropped_stale": refresher.dropped_stale, "failed_groups": refresher.failed}
    log.info("ppo: %d steps, %d episodes in %.1fs, final reward %s, KL %s, %d skipped", summary["steps"],
             summary["episodes"], progress.seconds, summary["final_reward_mean"], summary["final_kl"],
             progress.skipped)
    return summary
