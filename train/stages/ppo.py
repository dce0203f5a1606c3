"""The PPO stage: maximise R(x, y) - beta * log(pi(y|x) / pi_SFT(y|x)) against the STR reward model.

Models: the actor (the SFT causal LM, dropout off), a frozen reference copy of it, the frozen reward
model, and a critic initialised from the reward model (``train/value_model.py``). One step:

1. take ``batch_size`` prompts (the GLOBAL batch) in a seeded order (the position is checkpointed);
2. roll out: each process samples ``samples_per_prompt`` answers for its contiguous share of the
   prompts (the sampler keeps the actor's log-probs as it draws, or a forward recomputes them:
   ``ppo.rollout_logprobs``), then, without gradients, computes the reference's log-probs, the RM
   score and the critic's values (``collect_rollout``); the shares are gathered (``gather_rollout``)
   so every process holds the whole batch's rollout tensors;
3. shape the reward: missing-EOS penalty, per-token KL penalty, optional reward whitening; GAE;
   advantage whitening, all over the whole batch;
4. ``ppo_epochs`` x ``minibatches`` updates of actor (clipped ratio) and critic (clipped value loss),
   each minibatch split across processes (``ppo_update``);
5. log, hand the rollout groups to the ranking pool, refresh the RM (online variant), checkpoint.

Distributed (``accelerate launch``: DDP, or DeepSpeed ZeRO-2/3; see ``train.distributed``). The run
follows one process's trajectory up to float summation order, whatever the number of processes:

* sampling is seeded per answer (``seed, step, position in the global batch, sample index``) by
  :class:`RowSeededSampler`, so an answer does not depend on which process drew it;
* the rollout tensors are small next to the models, so they are all-gathered: whitening, GAE, reward
  statistics, the KL controller and the logged metrics see the same global batch on every process,
  and every minibatch is the same global set of episodes as in a one-process run, cut contiguously
  across processes; losses are sums over this process's tokens divided by the GLOBAL token count;
* actor and critic are ONE prepared module (``PolicyAndValue``) with ONE optimizer whose two parameter
  groups carry the actor and critic learning rates: accelerate makes one DeepSpeed engine per job,
  and AdamW's update is per parameter, so one optimizer with two groups equals two optimizers;
* the reference and reward models go through ``prepare_frozen`` (ZeRO-3 inference engines under
  ZeRO-3, optionally offloaded: ``ppo.offload_reference`` / ``ppo.offload_reward``); with
  ``ppo.policy: lora`` only LoRA adapters train and the reference is the actor with its adapters
  switched off (``AdapterDisabled``), so no reference copy is held at all;
* generation under ZeRO-3 gathers the actor's weights (``ppo.gather_for_generation``).

Gradient clipping: the actor's and the critic's gradients are clipped separately to ``max_grad_norm``
(0 = off), except under DeepSpeed, whose engine clips the whole module's gradient with one norm.

The maths lives in ``train/ppo_math.py``; each trick is named where it is used. A checkpoint holds
everything the next step depends on (weights, optimizer, KL controller, RNG states, data position),
written by the main process with full (gathered) weights, so ``resume=True`` continues exactly where
the run stopped, on any number of processes. Under DeepSpeed the optimizer moments are partitioned and
not checkpointed: a resumed DeepSpeed run restarts them (one-process and DDP resumes are exact).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from selfrank.atomic import write_jsonl
from selfrank.jsonl import read_appended_rows
from selfrank.ranking.engine import stable_seed
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
from selfrank.train.config import VARIANTS, ExperimentConfig, PPOConfig
from selfrank.train.data.tasks import load_task
from selfrank.train.dist.ranking_service import ranking_pool
from selfrank.train.sampling.generation import generate
from selfrank.train.models.causal_lm import load_model, save_model
from selfrank.train.models.peft_methods import AdapterDisabled, with_lora
from selfrank.train.rl.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    compute_rewards,
    entropy_from_logits,
    gae,
    logprobs_from_logits,
    masked_whiten,
    per_token_kl,
    policy_loss_terms,
    value_loss_terms,
)
from selfrank.train.models.reward_model import RewardModel, disable_dropout
from selfrank.train.models.masks import position_ids_from_mask
from selfrank.train.dist.stage_setup import begin_training, end_training, stage_cost
from selfrank.train.rundir import RunDir
from selfrank.train.progress import StepProgress
from selfrank.train.signals import stop_if_requested
from selfrank.train.stages.context import StageContext
from selfrank.train.stages.variants import per_variant
from selfrank.train.models.policy_value import PolicyAndValue
from selfrank.train.models.value_model import ValueModel
from selfrank.train.optim import adamw_groups
from selfrank.train.rl.online_rm import OnlineRewardRefresher

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
LOG_FILE = "log.jsonl"
# Settings that may change between an interrupted run and its resumption (the rest must not).
_RESUMABLE_CHANGES = ("steps", "save_every", "nan_policy", "gather_for_generation", "offload_reference",
                      "offload_reward")


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
    entropy: torch.Tensor  # (B,) sum over each answer's tokens of the sampling distribution's entropy
    texts: list[str]

    @property
    def query_length(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]

    @property
    def mean_entropy(self) -> float:
        """Mean per-token entropy of the sampling distribution over the batch's real tokens."""
        return float(self.entropy.sum() / self.mask.sum().clamp_min(1))


# ---- sampling ------------------------------------------------------------------------------------
class RowSeededSampler(LogitsProcessor):
    """Temperature / nucleus sampling where row ``i`` draws from its own seeded stream ``seeds[i]``.

    Why: a batched ``generate`` draws all rows from one random stream, so an answer depends on which
    other rows share its batch, and a run on N processes would sample differently from one process.
    Here each row's token is picked by inverse-CDF sampling with one uniform number from its own
    generator per step, and returned as the only finite score; ``generate`` runs greedy, which then
    takes exactly that token. The distribution is softmax(logits / T) cut to the top-p nucleus, the
    same as ``generate``'s own sampling (top-k off). The generators live on the CPU.

    With ``record=True`` it also keeps, per step, each row's log-probability of the picked token and
    the entropy under softmax(logits / T) (the whole distribution, as the update computes them), read
    back with :meth:`recorded`.
    """

    BLOCK = 32  # uniforms drawn per row at a time

    def __init__(self, seeds: list[int], temperature: float, top_p: float, record: bool = False):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = TemperatureLogitsWarper(temperature) if temperature != 1.0 else None
        self.top_p = TopPLogitsWarper(top_p=top_p) if top_p < 1.0 else None
        self.record = record
        self._uniform = torch.empty(0)
        self._step = 0
        self._logp: list[torch.Tensor] = []
        self._entropy: list[torch.Tensor] = []

    def _next_uniform(self) -> torch.Tensor:
        # Trick (speed): each row's generator fills a block of uniforms at once instead of one draw per
        # row per token; a block of n draws is the same numbers as n single draws, so samples do not change.
        column = self._step % self.BLOCK
        if column == 0:
            self._uniform = torch.stack([torch.rand(self.BLOCK, generator=g, dtype=torch.float64)
                                         for g in self.generators])
        self._step += 1
        return self._uniform[:, column]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"RowSeededSampler: {scores.shape[0]} rows but {len(self.generators)} seeds")
        if self.temperature is not None:
            scores = self.temperature(input_ids, scores)
        if self.record:
            logp_all = torch.log_softmax(scores.float(), dim=-1)
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        # 1 - U(0, 1) lies in (0, 1]: the target mass is > 0, so a zero-probability token is never picked.
        uniform = 1.0 - self._next_uniform()
        cdf = probs.cumsum(-1)
        target = (uniform.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
        picked = torch.searchsorted(cdf, target).clamp_(max=probs.shape[-1] - 1)
        if self.record:
            self._logp.append(logp_all.gather(1, picked).squeeze(1))
            self._entropy.append(-(logp_all.exp() * logp_all).sum(-1))
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, picked, 0.0)

    def recorded(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logp, entropy)``, each ``(B, steps)``: the first ``steps`` recorded tokens of every row."""
        if not self.record or len(self._logp) < steps:
            raise RuntimeError(f"RowSeededSampler recorded {len(self._logp)} steps, {steps} asked for")
        return torch.stack(self._logp[:steps], 1), torch.stack(self._entropy[:steps], 1)


def row_seeds(seed: int, step: int, start: int, end: int, samples_per_prompt: int) -> list[int]:
    """One sampling seed per answer of prompts ``start..end-1`` of the step's global batch."""
    return [stable_seed("ppo-sample", seed, step, b, j) for b in range(start, end) for j in range(samples_per_prompt)]


# ---- forwards ------------------------------------------------------------------------------------
def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """Logits predicting each response token, ``(B, R, V)``.

    Trick (speed): the last token is never an input (nothing is predicted after it), and only the R
    positions that predict response tokens go through the LM head (``logits_to_keep``); the prompt's
    positions would cost as much vocabulary projection again for nothing. Positions come from the mask
    so that left padding does not shift them (the same position ids ``generate`` used while sampling).
    """
    out = model(**_shifted_inputs(input_ids, attention_mask, response_length))
    return out.logits


def _shifted_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> dict:
    input_ids, attention_mask = input_ids[:, :-1], attention_mask[:, :-1]
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask), "use_cache": False,
            "logits_to_keep": response_length}


def response_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     response_length: int, values_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Actor logits ``(B, R, V)`` and critic values ``(B, R)`` for the response positions, in ONE call of
    the (prepared) ``PolicyAndValue`` module: DDP and DeepSpeed only see calls of the wrapped module.
    The critic reads the same inputs (the last token is not an input either). ``values_only``: the
    actor does not run and the logits are None (no-gradient rollouts only)."""
    logits, values = model(**_shifted_inputs(input_ids, attention_mask, response_length), values_only=values_only)
    return logits, values[:, -response_length:]


def logprobs_at_sampling(cfg: PPOConfig, model, accelerator) -> bool:
    """Whether the rollout keeps the sampler's log-probs (``ppo.rollout_logprobs``) instead of a forward.

    ``auto``: yes for fp32 weights without autocast. Why not otherwise: ``generate`` runs the bare
    actor, while the update's forward may run under accelerate's autocast or in half precision, and
    then the two differ by far more than round-off, so the first ratio would not start at 1."""
    if cfg.rollout_logprobs != "auto":
        return cfg.rollout_logprobs == "sampling"
    policy = dist.unwrap(model, accelerator).policy
    return (getattr(accelerator, "mixed_precision", "no") == "no"
            and next(policy.parameters()).dtype == torch.float32)


@torch.no_grad()
def collect_rollout(model, ref, rm, tokenizer, prompts: list[str], cfg: PPOConfig, seeds: list[int],
                    accelerator=None) -> Rollout:
    """Sample and score this process's share of a batch (no gradients anywhere).

    ``model`` is the (prepared) ``PolicyAndValue``; ``ref`` and ``rm`` the (prepared) frozen models;
    ``seeds`` one sampling seed per answer (:func:`row_seeds`). Collective under a launcher."""
    acc = accelerator if accelerator is not None else dist.get_accelerator()
    k = cfg.samples_per_prompt
    gather = cfg.gather_for_generation
    from_sampling = logprobs_at_sampling(cfg, model, acc)
    sampler = RowSeededSampler(seeds, cfg.temperature, cfg.top_p, record=from_sampling)
    with dist.gathered_for_generation(model, acc, gather=gather) as inner:
        gen = generate(inner.policy, tokenizer, prompts, n=k, do_sample=False, max_new_tokens=cfg.max_new_tokens,
                       batch_size=max(1, len(prompts) * k),
                       generate_kwargs={"logits_processor": LogitsProcessorList([sampler]),
                                        **dist.generation_kwargs(model, acc, gather=gather)})
    device = acc.device
    response_ids = gen.response_ids.to(device)
    mask = gen.response_mask.to(device)
    input_ids = torch.cat([gen.query_ids.to(device), response_ids], dim=1)
    attention_mask = torch.cat([gen.query_mask.to(device), mask], dim=1)
    length = response_ids.shape[1]

    if from_sampling:
        # Trick (speed): the log-probs the sampler saw while drawing, so the actor runs no second forward
        # over the batch; they differ from the update's forward only by float round-off (cached keys).
        logp, token_entropy = (t.to(device) for t in sampler.recorded(length))
        logp = logp.masked_fill(mask == 0, 0.0)
        _, values = response_forward(model, input_ids, attention_mask, length, values_only=True)
    else:
        # Log-probs recomputed by a plain forward at the sampling temperature (logits / T), the same
        # computation the update will repeat, so the first ratio is exactly 1 (no generate-vs-forward drift).
        logits, values = response_forward(model, input_ids, attention_mask, length)
        logits = logits.float() / cfg.temperature
        logp = logprobs_from_logits(logits, response_ids)
        token_entropy = entropy_from_logits(logits)
        del logits
    entropy = (token_entropy * mask).sum(1)
    ref_logp = logprobs_from_logits(response_logits(ref, input_ids, attention_mask, length), response_ids,
                                    cfg.temperature)
    # The RM reads the last real token: the EOS when the answer ended, as in its training texts.
    raw = rm(input_ids, attention_mask)
    score = dist.unwrap(rm, acc).normalized(raw)
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, response_ids=response_ids, mask=mask,
                   ended=gen.ended.to(device), logp=logp, ref_logp=ref_logp, values=values.float(),
                   raw_score=raw.float(), score=score.float(), entropy=entropy, texts=gen.texts)


def _pad_to(tensor: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if missing <= 0:
        return tensor
    pad = torch.full((tensor.shape[0], missing), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor] if left else [tensor, pad], dim=1)


def gather_rollout(local: Rollout, accelerator, pad_id: int) -> Rollout:
    """All processes' rollouts concatenated in rank order (the global batch's order). Collective.

    Queries are left-padded and responses right-padded to the widest across processes, the layout a
    one-process run over the whole batch has. Identity on one process."""
    acc = accelerator
    if acc.num_processes == 1:
        return local
    query_len = local.query_length
    widths = torch.tensor([query_len, local.response_ids.shape[1]], device=acc.device)
    query_width, response_width = (int(w) for w in acc.gather(widths.unsqueeze(0)).max(0).values)

    def whole(tensor: torch.Tensor) -> torch.Tensor:
        return acc.gather(tensor.contiguous())

    query_ids = _pad_to(local.input_ids[:, :query_len], query_width, pad_id, left=True)
    query_mask = _pad_to(local.attention_mask[:, :query_len], query_width, 0, left=True)
    response = {name: _pad_to(getattr(local, name), response_width, value, left=False)
                for name, value in (("response_ids", pad_id), ("mask", 0), ("logp", 0.0), ("ref_logp", 0.0),
                                    ("values", 0.0))}
    response_ids, mask = whole(response["response_ids"]), whole(response["mask"])
    return Rollout(input_ids=torch.cat([whole(query_ids), response_ids], dim=1),
                   attention_mask=torch.cat([whole(query_mask), mask], dim=1), response_ids=response_ids,
                   mask=mask, ended=whole(local.ended), logp=whole(response["logp"]),
                   ref_logp=whole(response["ref_logp"]), values=whole(response["values"]),
                   raw_score=whole(local.raw_score), score=whole(local.score), entropy=whole(local.entropy),
                   texts=dist.gather_lists(local.texts))


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


_STAT_KEYS = ("loss/policy", "loss/value", "policy/clipfrac", "value/clipfrac", "policy/approxkl", "policy/ratio")


def _clip_norm(params, max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0 = off: only the norm is measured, for the finiteness check)."""
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm if max_norm > 0 else math.inf)


def ppo_update(model, optimizer, ro: Rollout, advantages: torch.Tensor, returns: torch.Tensor, cfg: PPOConfig,
               generator: torch.Generator, accelerator=None) -> dict | None:
    """``ppo_epochs`` passes over the global batch ``ro`` in ``minibatches`` shuffled minibatches.

    Every process draws the same global shuffle and trains on its contiguous share of each minibatch;
    the loss is this share's token sum over the minibatch's GLOBAL token count (``global_mean_loss``),
    so the update is that of one process over the whole minibatch. Returns mean statistics (global), or
    ``None`` when a loss or gradient norm was NaN/inf on any process: the offending minibatch is not
    applied and the remaining ones are skipped (earlier, finite updates stay). Collective."""
    acc = accelerator if accelerator is not None else dist.get_accelerator()
    deepspeed = dist.uses_deepspeed(acc)
    inner = dist.unwrap(model, acc)
    n = ro.input_ids.shape[0]
    size = n // cfg.minibatches
    lo, hi = dist.shard_bounds(size, acc.process_index, acc.num_processes)
    length = ro.response_ids.shape[1]
    # Per minibatch: this process's sums of the five statistics, and its token count.
    sums = []
    for _ in range(cfg.ppo_epochs):
        # Trick: a fresh shuffle every epoch; the generator is seeded per step, so resuming repeats it.
        order = torch.randperm(n, generator=generator).to(ro.input_ids.device)
        for start in range(0, n, size):
            idx = order[start:start + size][lo:hi]
            ids, attn, mask = ro.input_ids[idx], ro.attention_mask[idx], ro.mask[idx]
            mask_f = mask.float()

            logits, new_values = response_forward(model, ids, attn, length)
            new_logp = logprobs_from_logits(logits, ro.response_ids[idx], cfg.temperature)
            # Actor: clipped surrogate on the ratio of new to sampling-time probabilities.
            pg, pg_clipped, half_sq = policy_loss_terms(new_logp, ro.logp[idx], advantages[idx], cfg.clip_range)
            # Critic: clipped value loss around the values the advantages were computed with.
            vf, vf_clipped = value_loss_terms(new_values, ro.values[idx], returns[idx], cfg.value_clip)
            pg_sum, vf_sum = (pg * mask_f).sum(), (vf * mask_f).sum()
            loss_sum = pg_sum + cfg.vf_coef * vf_sum
            count = mask_f.sum()
            if float(dist.reduce_sum(float(not _finite(loss_sum)), acc)) > 0:
                return None  # every process agrees (a collective), so none goes on alone

            optimizer.zero_grad(set_to_none=True)
            acc.backward(dist.global_mean_loss(loss_sum, count, acc))
            if not deepspeed:
                # Trick: global gradient-norm clipping, per network; a non-finite norm means a poisoned
                # step. The gradients are already averaged over processes, so all see the same norms.
                actor_norm = _clip_norm(inner.policy.parameters(), cfg.max_grad_norm)
                critic_norm = _clip_norm(inner.value.parameters(), cfg.max_grad_norm)
                if not _finite(actor_norm, critic_norm):
                    optimizer.zero_grad(set_to_none=True)
                    return None
            optimizer.step()  # under DeepSpeed the engine stepped (and clipped) in ``backward``

            with torch.no_grad():
                ratio = torch.exp(new_logp.detach() - ro.logp[idx])  # logged as TRL's val/ratio
                sums.append(torch.stack([pg_sum.detach(), vf_sum.detach(), (pg_clipped * mask_f).sum(),
                                         (vf_clipped * mask_f).sum(), (half_sq * mask_f).sum(),
                                         (ratio * mask_f).sum(), count]).double())
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


# ---- checkpoint ----------------------------------------------------------------------------------
def _fingerprint(config: ExperimentConfig, n_prompts: int, online_rm: bool) -> dict:
    ppo = {k: v for k, v in vars(config.ppo).items() if k not in _RESUMABLE_CHANGES}
    return {"ppo": ppo, "seed": config.seed, "prompts": n_prompts, "online_rm": online_rm}


@dataclass
class _Progress:
    step: int = 0  # completed steps
    cursor: int = 0  # prompts consumed
    episodes: int = 0
    skipped: int = 0
    seconds: float = 0.0  # training time before this process (resumed runs)


def _checkpoint_weights(actor, critic, rm: RewardModel | None) -> dict:
    # The online variant trains the RM itself, so it is part of the state.
    return {"actor": actor, "critic": critic, **({"reward_model": rm} if rm is not None else {})}


def _save_ppo_checkpoint(folder: Path, actor, critic, rm: RewardModel | None, optimizers: dict, kl_ctl,
                         progress: _Progress, fingerprint: dict) -> None:
    """Everything the next step depends on, from plain full modules (``optimizers``: name -> optimizer,
    empty under DeepSpeed, which partitions them)."""
    save_checkpoint(folder, models=_checkpoint_weights(actor, critic, rm), optimizers=optimizers,
                    state={**dataclasses.asdict(progress), "kl_controller": kl_ctl.state_dict(),
                           "fingerprint": fingerprint})


def _load_ppo_checkpoint(folder: Path, actor, critic, rm: RewardModel | None, kl_ctl, fingerprint: dict) -> _Progress:
    """Weights into the plain modules (before ``prepare``), the KL controller and the RNG states; the
    optimizers are loaded by the caller once they are prepared (``load_optimizers``)."""
    check_fingerprint(read_state(folder) or {}, fingerprint, folder, "PPO")
    state = load_checkpoint(folder, models=_checkpoint_weights(actor, critic, rm))
    kl_ctl.load_state_dict(state["kl_controller"])
    return _Progress(**{f.name: state[f.name] for f in dataclasses.fields(_Progress)})


def _restart_log(path: Path, keep_until_step: int) -> None:
    """Keep the log lines of the steps the checkpoint holds, drop later ones (they will be redone)."""
    rows = ([row for row in read_appended_rows(path) if row.get("step", math.inf) <= keep_until_step]
            if keep_until_step > 0 else [])
    write_jsonl(path, rows)


# ---- the loop ------------------------------------------------------------------------------------
def _check_same_tokenizer(tokenizer, rm: RewardModel, rm_folder: Path) -> None:
    other = rm.tokenizer
    if other is None:
        return
    if (len(other) != len(tokenizer) or other.pad_token_id != tokenizer.pad_token_id
            or other.eos_token_id != tokenizer.eos_token_id or other.get_vocab() != tokenizer.get_vocab()):
        raise UserError(f"{rm_folder}: the reward model's tokenizer differs from the actor's; PPO scores the "
                        "actor's token ids directly, so both must share one tokenizer")


def _check_layout(cfg: PPOConfig, world: int) -> None:
    """The global batch and each minibatch must split evenly across processes (each episode once)."""
    if cfg.batch_size % world:
        raise UserError(f"ppo.batch_size: {cfg.batch_size} prompts cannot be split evenly across {world} "
                        f"processes; use a multiple of {world}")
    minibatch = cfg.batch_size * cfg.samples_per_prompt // cfg.minibatches
    if minibatch % world:
        raise UserError(f"ppo.minibatches: minibatches of {minibatch} episodes cannot be split evenly across "
                        f"{world} processes; batch_size * samples_per_prompt / minibatches must be a multiple "
                        f"of {world}")


def _peak_memory(accelerator) -> dict:
    """``peak_gpu_memory_bytes``: the largest ``max_memory_allocated`` over processes (CUDA only)."""
    if not torch.cuda.is_available():
        return {}
    peak = torch.tensor([float(torch.cuda.max_memory_allocated())], device=accelerator.device)
    return {"peak_gpu_memory_bytes": int(accelerator.gather(peak).max())}


def train_ppo(config: ExperimentConfig, prompts: list[str], actor_folder: Path, rm_folder: Path, out_folder: Path,
              *, resume: bool = False, ranking_pool=None, online_rm: bool = False,
              log_step: Callable[[dict, int], None] | None = None) -> dict:
    """Run PPO; write ``actor/``, ``critic/``, ``checkpoint/`` and ``log.jsonl`` under ``out_folder``.

    ``ranking_pool`` (optional; under a launcher each process's handle on its node's pool) receives
    every step's rollout groups asynchronously, each process submitting the groups of its own prompts;
    with ``online_rm`` the RM is refreshed every ``ppo.online_rm_every`` steps from the ranked groups
    of all processes. Collective under a launcher: every process calls it with the same arguments;
    only the main process writes. Returns the stage summary (on every process)."""
    cfg = config.ppo
    if not prompts:
        raise UserError("ppo: no training prompts (task.train is empty)")
    if online_rm and ranking_pool is None:
        raise ValueError("online_rm needs a ranking_pool")
    if online_rm and cfg.online_rm_every < 1:
        raise UserError("ppo.online_rm_every: must be >= 1 for the online reward-model variant")
    _check_layout(cfg, dist.world_size())
    out_folder = Path(out_folder)
    checkpoint = out_folder / CHECKPOINT
    log_path = out_folder / LOG_FILE
    n_episodes = cfg.batch_size * cfg.samples_per_prompt
    per_process = n_episodes // cfg.minibatches // dist.world_size()
    acc = begin_training(1, per_process)  # one optimizer step per minibatch
    main = acc.is_main_process
    deepspeed = dist.uses_deepspeed(acc)
    if main:
        out_folder.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    lora = cfg.policy == "lora"
    with dist.whole_weights(acc):
        actor, tokenizer = load_model(Path(actor_folder), config.model)
        # A LoRA actor's reference is the actor with its adapters off: no second copy to hold.
        ref = None if lora else load_model(Path(actor_folder), config.model)[0]
        rm = RewardModel.from_pretrained(rm_folder, config.model)
        _check_same_tokenizer(tokenizer, rm, Path(rm_folder))
        critic = ValueModel.from_reward_model(rm)
    # Trick: dropout off everywhere, so log-probs and values are the same functions in rollout and update.
    for model in (actor, ref, critic):
        if model is not None:
            disable_dropout(model)
    if lora:
        actor = with_lora(actor, cfg.lora_r, cfg.lora_alpha, field="ppo.policy")
    if online_rm:
        # Trained in place by the refresher (weights broadcast to every process), so not a frozen engine.
        rm.to(acc.device).eval().requires_grad_(False)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    fingerprint = _fingerprint(config, len(prompts), online_rm)

    progress = _Progress()
    if resume and find_checkpoint(checkpoint) is not None:
        progress = _load_ppo_checkpoint(checkpoint, actor, critic, rm if online_rm else None, kl_ctl, fingerprint)
        log.info("ppo: resuming after step %d of %d (%s)", progress.step, cfg.steps, checkpoint)
    elif find_checkpoint(checkpoint) is not None:
        log.info("ppo: discarding the old checkpoint %s (not resuming)", checkpoint)
        dist.save_on_main(lambda: discard_checkpoint(checkpoint), acc)
    dist.save_on_main(lambda: _restart_log(log_path, progress.step), acc)

    # Actor and critic: one module, one optimizer (actor lr, critic lr), one DDP wrapper / DeepSpeed engine.
    policy_value = PolicyAndValue(actor, critic).to(acc.device).train()
    optimizer = adamw_groups([(actor, cfg.lr), (critic, cfg.critic_lr)], fused=not deepspeed)
    model, optimizer = dist.prepare_trainable(acc, policy_value, optimizer, micro_batch_size=per_process,
                                              max_grad_norm=cfg.max_grad_norm)
    # The LoRA view calls the actor inside its engine (ZeRO-3 gathers its shards as for any forward).
    ref = AdapterDisabled(actor) if lora else dist.prepare_frozen(ref, acc, offload=cfg.offload_reference)
    rm_run = rm if online_rm else dist.prepare_frozen(rm, acc, offload=cfg.offload_reward)
    refresher = OnlineRewardRefresher(rm, rm.tokenizer or tokenizer, config) if online_rm else None
    if progress.step > 0:
        optimizers = {"policy_value": optimizer}
        if deepspeed:  # the checkpoint holds none: DeepSpeed partitions optimizer states
            log.warning("ppo: resuming under DeepSpeed restarts the actor/critic optimizer moments")
            optimizers = {}
        if refresher is not None:
            optimizers["reward_model"] = refresher.optimizer
        load_optimizers(checkpoint, optimizers)

    def checkpoint_now() -> None:
        """Collective: the full weights are gathered under ZeRO-3; the main process writes."""
        optimizers = {} if deepspeed else {"policy_value": optimizer}
        if refresher is not None:
            optimizers["reward_model"] = refresher.optimizer
        dist.save_full(model, acc, lambda inner: _save_ppo_checkpoint(
            checkpoint, inner.policy, inner.value, rm if online_rm else None, optimizers, kl_ctl, progress,
            fingerprint))

    started = time.perf_counter()
    last: dict = {}
    dropped_groups = [0]  # rollout groups the full ranking pool could not take
    use_pool = ranking_pool is not None
    bar = StepProgress(f"ppo {out_folder.name}", cfg.steps, initial=progress.step, enabled=main)
    log_file = open(log_path, "a", encoding="utf-8") if main else None
    try:

        def write_log(row: dict) -> None:
            if log_file is not None:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()

        def non_finite(step: int, what: str, next_cursor: int) -> None:  # None: the step has no log row
            """Apply ``ppo.nan_policy`` to a NaN/inf found in ``what`` at ``step`` (1-based); every process
            sees the same global values, so all take this branch together."""
            progress.skipped += 1
            if cfg.nan_policy == "stop":
                # The checkpoint is the state before this step: a resumed run retries the same batch.
                checkpoint_now()
                raise NonFiniteError(f"ppo step {step}: non-finite {what}; stopped (ppo.nan_policy: stop) with "
                                     f"a checkpoint in {checkpoint}")
            # Skipping consumes the batch: the next step takes the next prompts.
            progress.cursor = next_cursor
            progress.episodes += n_episodes
            if main:
                log.warning("ppo step %d: non-finite %s; step skipped (%d so far)", step, what, progress.skipped)
            write_log({"step": step, "skipped": what, "skipped_total": progress.skipped})

        def _one_step(step: int) -> dict | None:
            """One PPO iteration; returns its log row, or None when it was skipped."""
            tick = time.perf_counter()
            picked, next_cursor = prompt_indices(len(prompts), progress.cursor, cfg.batch_size, config.seed)
            batch_prompts = [prompts[i] for i in picked]
            lo, hi = dist.shard_bounds(cfg.batch_size, acc.process_index, acc.num_processes)
            local = collect_rollout(model, ref, rm_run, tokenizer, batch_prompts[lo:hi], cfg,
                                    row_seeds(config.seed, step, lo, hi, cfg.samples_per_prompt), acc)
            ro = gather_rollout(local, acc, tokenizer.pad_token_id)
            del local

            # Async ranking of this process's groups (the K answers of each prompt); never waits.
            if use_pool:
                k = cfg.samples_per_prompt
                for i, prompt in enumerate(batch_prompts[lo:hi], start=lo):
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
                # Trick: advantage whitening over the whole (global) batch.
                advantages = masked_whiten(advantages, ro.mask) * ro.mask
                if not _finite(advantages, returns):
                    return non_finite(step, "advantages", next_cursor)

            generator = torch.Generator().manual_seed(stable_seed("ppo-minibatch", config.seed, step))
            stats = ppo_update(model, optimizer, ro, advantages, returns, cfg, generator, acc)
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
                "time/step_s": elapsed,
                "tokens/s": float(ro.mask.sum()) / max(elapsed, 1e-9),
            }
            if use_pool:
                pool_stats = ranking_pool.stats()
                row["ranking/queue_depth"] = pool_stats.get("queue_depth")
                row["ranking/latency_s"] = pool_stats.get("latency_mean_s")
                row["ranking/dropped_groups"] = dropped_groups[0]
            if refresher is not None and step % cfg.online_rm_every == 0:
                refresh_gen = torch.Generator().manual_seed(stable_seed("ppo-online-rm", config.seed, step))
                row.update(refresher.refresh(step, refresh_gen, acc))
            return row

        def checkpoint_on_stop() -> None:
            progress.seconds += time.perf_counter() - started
            checkpoint_now()

        for step_index in bar:
            # Preemption (SIGTERM/SIGUSR1): checkpoint the completed steps, then stop for a requeue.
            stop_if_requested("ppo", step_index, checkpoint_on_stop, checkpoint)
            step = step_index + 1
            row = _one_step(step)
            progress.step = step
            if row is not None:
                write_log(row)
                if log_step is not None:
                    log_step(row, step)
                last = row
                bar.set_postfix(reward=f"{row['reward/mean']:.3f}", kl=f"{row['objective/kl']:.3f}")
            if step % cfg.save_every == 0 and step < cfg.steps:
                progress.seconds += time.perf_counter() - started
                started = time.perf_counter()
                checkpoint_now()
    finally:
        if log_file is not None:
            log_file.close()
    bar.close()

    progress.seconds += time.perf_counter() - started
    checkpoint_now()

    def save_final(inner: PolicyAndValue) -> None:
        save_model(inner.policy, tokenizer, out_folder / "actor")
        inner.value.save_pretrained(out_folder / "critic")
        if online_rm:
            rm.save_pretrained(out_folder / "reward_model")

    dist.save_full(model, acc, save_final)
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
    if ranking_pool is not None:
        summary["ranking_dropped_groups"] = dropped_groups[0]
    if refresher is not None:
        summary["online_rm"] = {"dropped_stale": refresher.dropped_stale, "failed_groups": refresher.failed}
    end_training(acc)
    log.info("ppo: %d steps, %d episodes in %.1fs, final reward %s, KL %s, %d skipped", summary["steps"],
             summary["episodes"], progress.seconds, summary["final_reward_mean"], summary["final_kl"],
             progress.skipped)
    return summary


def run(config: ExperimentConfig, run: RunDir, resume: bool, ctx: StageContext) -> dict:
    """The PPO stage: one policy per STR variant (``ppo/<variant>/``), each against its own reward model.
    Collective: the online variant ranks its rollouts through the node's pool."""
    sft_model = run.require("sft") / "model"
    prompts = [ex.prompt for ex in load_task(config.task).train]

    def train_one(variant: str, stage: str) -> dict:
        rm_folder = run.require(f"reward/{variant}") / "model"
        log_step = ctx.hooks.stage_log("ppo", f"{variant}/")
        if not VARIANTS[variant].online_rm:
            return train_ppo(config, prompts, sft_model, rm_folder, run.stage(stage), resume=resume,
                             log_step=log_step)
        with ranking_pool(config.ranking, config.sample.workers, group=ctx.barrier.group, wait=ctx.barrier.wait,
                          ready=True) as pool:
            return train_ppo(config, prompts, sft_model, rm_folder, run.stage(stage), resume=resume,
                             ranking_pool=pool, online_rm=True, log_step=log_step)

    return per_variant(config, run, "ppo", train_one)
