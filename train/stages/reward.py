"""Reward-model stage: preference data, losses, held-out split, training, normaliser.

The paper trains a GPT-2 reward model on (better, worse) pairs with ``-log sigmoid(r_w - r_l)``
(Adam, lr 3e-5, batch 16, max length 256). Two things differ here on purpose:

* the held-out split is by PROMPT: a prompt (and every group/pair of it) is either trained on or
  held out, never both, so held-out accuracy measures generalisation to unseen questions;
* after training the rewards are normalised (``gain``, ``bias``) so that the reference policy's
  samples score mean 0, std 1, which keeps PPO's reward scale independent of the RM run.

Beyond the paper, ``loss="listwise"`` trains on each group's whole ranked list with the
Plackett-Luce likelihood of its best-first order.

Distributed (``accelerate launch``, see ``train.dist``): ``reward.batch_size`` is the GLOBAL
batch; its items are split contiguously across ranks (sizes may differ by one) and the update follows
the gradient of the summed per-pair (per-list) loss over the GLOBAL count, so N processes follow one
process's trajectory. Held-out scoring and the normaliser are sharded by example and gathered. Only the
main process writes; checkpoints hold the full weights (gathered under ZeRO-3), loaded into the plain
module before ``prepare`` on every rank, and the optimizer state (under DeepSpeed its partitions, written
by every process and restored into the prepared engine: ``train/dist/engine_state.py``), so resumes
are exact everywhere.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from selfrank.errors import UserError
from selfrank.ranking.engine import stable_seed

from selfrank.train import dist
from selfrank.train.checkpoint import (
    check_fingerprint,
    discard_checkpoint,
    find_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from selfrank.train.config import VARIANTS, ExperimentConfig
from selfrank.train.data.preferences import (
    LOSSES,
    PreferencePair,
    heldout_prompts,
    load_pairs,
    load_ranked,
    split_pairs,
    training_items,
)
from selfrank.train.models.causal_lm import load_causal_lm
from selfrank.train.models.reward_model import RewardModel, encode_pairs, listwise_scores, pairwise_rewards, score
from selfrank.train.rl.reward_losses import listwise_loss_sum, pairwise_accuracy, pairwise_loss_sum
from selfrank.train.rundir import RunDir
from selfrank.train.scale import apply_model_switches
from selfrank.train.progress import StepProgress
from selfrank.train.signals import stop_if_requested
from selfrank.train.stages.context import StageContext
from selfrank.train.stages.scored_answers import scored_groups
from selfrank.train.stages.variants import per_variant
from selfrank.train.dist.stage_setup import begin_training, end_training, stage_cost, uneven_shard

log = logging.getLogger(__name__)

# Train accuracy is a sanity figure; a fixed subset keeps its cost bounded on large pair files.
TRAIN_ACCURACY_MAX_PAIRS = 2000
NORMALIZER_MIN_STD = 1e-6


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffle of one epoch, a function of (seed, epoch) only: a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(stable_seed("reward-shuffle", seed, epoch))
    return torch.randperm(n, generator=generator).tolist()


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    per_epoch = math.ceil(n / batch_size)
    epoch, position = divmod(step, per_epoch)
    order = _epoch_order(n, seed, epoch)
    return order[position * batch_size:(position + 1) * batch_size]


# ---- checkpoint ---------------------------------------------------------------------------------
CHECKPOINT_MODEL = "reward_model"
CHECKPOINT_OPTIMIZER = "adamw"


# ---- training --------------------------------------------------------------------------------------
def _fresh_model(config: ExperimentConfig, sft_folder: Path) -> RewardModel:
    backbone = config.reward.backbone
    if backbone == "sft":
        if not Path(sft_folder).is_dir():
            raise UserError(f"{sft_folder}: SFT model folder not found (run the sft stage first)")
        return RewardModel.from_causal_lm(Path(sft_folder), model_cfg=config.model)
    lm, tokenizer = load_causal_lm(backbone, config.model)
    rm = RewardModel.from_causal_lm(lm, tokenizer=tokenizer)
    rm.source = backbone
    return rm


def fit_normalizer(raw: np.ndarray) -> dict:
    """``gain``, ``bias`` with ``gain * raw + bias`` of mean 0 and (population) std 1 over ``raw``."""
    mean = float(np.mean(raw))
    std = float(np.std(raw))
    # A reward that does not vary on the reference samples cannot be rescaled; only centre it.
    gain = 1.0 / std if std > NORMALIZER_MIN_STD else 1.0
    return {"gain": gain, "bias": -mean * gain, "reference_mean": mean, "reference_std": std,
            "reference_samples": int(raw.size)}


def sharded_score(rm: RewardModel, tokenizer, prompts: list[str], responses: list[str], batch_size: int,
                  max_length: int, acc) -> np.ndarray:
    """Raw rewards of every pair, each rank scoring its contiguous slice (``rm`` holds the full
    weights on every rank); the slices are gathered in order, so every rank gets the whole array.
    Collective."""
    if not prompts:
        return np.zeros(0, dtype=np.float32)
    index, real = uneven_shard(list(range(len(prompts))), acc)
    local = (score(rm, tokenizer, [prompts[i] for i in index], [responses[i] for i in index], batch_size,
                   max_length, normalized=False).tolist() if real else [])
    return np.asarray(dist.gather_lists(local), dtype=np.float32)


def _accuracy(rm: RewardModel, tokenizer, pairs: list[PreferencePair], use_noise: bool, batch_size: int,
              max_length: int, acc) -> float | None:
    if not pairs:
        return None
    prompts = [p.prompt for p in pairs]
    r_w = sharded_score(rm, tokenizer, prompts, [p.winner for p in pairs], batch_size, max_length, acc)
    r_l = sharded_score(rm, tokenizer, prompts, [p.loser_text(use_noise) for p in pairs], batch_size, max_length, acc)
    return pairwise_accuracy(torch.from_numpy(r_w), torch.from_numpy(r_l))


def _evaluate_and_normalize(rm: RewardModel, tokenizer, config: ExperimentConfig, train_subset, heldout_pairs,
                            use_noise: bool, normalize_prompts, normalize_responses, eval_batch: int, acc) -> dict:
    """Train/held-out accuracies and the fitted normaliser (set on ``rm``). Collective (sharded scoring)."""
    cfg = config.reward
    out = {
        "train_accuracy": _accuracy(rm, tokenizer, train_subset, False, eval_batch, cfg.max_length, acc),
        "heldout_accuracy": _accuracy(rm, tokenizer, heldout_pairs, False, eval_batch, cfg.max_length, acc),
    }
    if use_noise:
        out["heldout_accuracy_noised"] = _accuracy(rm, tokenizer, heldout_pairs, True, eval_batch, cfg.max_length, acc)
    if cfg.normalize and normalize_responses:
        raw = sharded_score(rm, tokenizer, list(normalize_prompts), list(normalize_responses), eval_batch,
                            cfg.max_length, acc)
        normalizer = fit_normalizer(raw)
    else:
        normalizer = {"gain": 1.0, "bias": 0.0, "reference_samples": 0}
    rm.set_normalizer(normalizer["gain"], normalizer["bias"])
    out["normalizer"] = normalizer
    return out


def train_reward(config: ExperimentConfig, sft_folder: Path, pairs_path: Path, ranked_path: Path,
                 out_folder: Path, *, loss: str = "pairwise", use_noise: bool = False, resume: bool = False,
                 normalize_prompts: list[str] | None = None, normalize_responses: list[str] | None = None,
                 checkpoint_folder: Path | None = None,
                 on_step: Callable[[int, float], None] | None = None,
                 log_step: Callable[[dict, int], None] | None = None) -> dict:
    """Train, evaluate on held-out prompts, normalise and save a reward model to ``out_folder``.

    ``normalize_prompts``/``normalize_responses``: the reference policy's samples that should score
    mean 0, std 1 (default: every response in ``ranked_path``). ``checkpoint_folder`` (default
    ``out_folder.parent / "checkpoint"``) is written every ``reward.save_every`` steps and removed on
    success; ``resume`` continues from it exactly. ``on_step(step, loss)`` is called after each step
    (and after its checkpoint); ``log_step(metrics, step)`` before it, with the step's global ``loss``
    (and, pairwise, the batch ``accuracy``). Collective under a launcher: every rank calls it alike.
    Returns the stage summary."""
    if loss not in LOSSES:
        raise UserError(f"reward loss: must be one of {', '.join(LOSSES)}; got {loss!r}")
    cfg = config.reward
    started = time.monotonic()
    out_folder = Path(out_folder)
    checkpoint_folder = Path(checkpoint_folder) if checkpoint_folder else out_folder.parent / "checkpoint"

    pairs = load_pairs(pairs_path)
    groups = load_ranked(ranked_path)
    all_prompts = [p.prompt for p in pairs] + [g.prompt for g in groups]
    heldout = heldout_prompts(all_prompts, cfg.heldout_fraction, config.seed)
    train_pairs, heldout_pairs = split_pairs(pairs, heldout)
    items_text = training_items(pairs, groups, heldout, loss, use_noise)
    if not items_text:
        raise UserError(f"{pairs_path if loss == 'pairwise' else ranked_path}: no {loss} training data "
                        f"outside the held-out prompts ({len(heldout)} held out)")
    if normalize_prompts is None and normalize_responses is None:
        normalize_prompts = [g.prompt for g in groups for _ in g.responses]
        normalize_responses = [r for g in groups for r in g.responses]
    if len(normalize_prompts or []) != len(normalize_responses or []):
        raise ValueError("normalize_prompts and normalize_responses must have the same length")

    per_epoch = math.ceil(len(items_text) / cfg.batch_size)
    total_steps = max(1, math.ceil(cfg.epochs * per_epoch))
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    fingerprint = {
        "loss": loss, "use_noise": use_noise, "lr": cfg.lr, "batch_size": cfg.batch_size,
        "max_length": cfg.max_length, "seed": config.seed, "total_steps": total_steps,
        "items": len(items_text), "items_hash": stable_seed(*(p + "\x1e" + "\x1e".join(t) for p, t in items_text)),
    }

    state = read_state(checkpoint_folder) if resume else None
    if state is not None:
        check_fingerprint(state, fingerprint, checkpoint_folder, "reward")
    else:
        if find_checkpoint(checkpoint_folder) is not None:
            log.info("reward: discarding the old checkpoint %s (not resuming)", checkpoint_folder)
        discard_checkpoint(checkpoint_folder)
    acc = begin_training(1, max(1, cfg.batch_size // dist.world_size()), config.model.mixed_precision)
    deepspeed = dist.uses_deepspeed(acc)  # a ZeRO optimizer is partitioned: no process holds it whole
    torch.manual_seed(config.seed)
    # A resumed run loads the checkpoint's full weights into the module: it must not be ZeRO-3 partitioned
    # yet (prepare partitions it). A fresh one may load partitioned.
    with dist.whole_weights(acc) if state is not None else contextlib.nullcontext():
        rm = _fresh_model(config, sft_folder)
    tokenizer = rm.tokenizer
    if tokenizer is None or tokenizer.pad_token_id is None:
        raise UserError(f"{sft_folder}: the tokenizer needs a pad token for reward-model batches")
    rm.train()
    apply_model_switches(rm, config.model)
    optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=0.0)
    resumed_from, losses = 0, []
    if state is not None:
        # Into the plain module and torch optimizer, before prepare, on every rank (a DeepSpeed engine's
        # partitions once it is prepared, below).
        load_checkpoint(checkpoint_folder, models={CHECKPOINT_MODEL: rm},
                        optimizers={} if deepspeed else {CHECKPOINT_OPTIMIZER: optimizer})
        resumed_from, losses = int(state["step"]), [float(x) for x in state["losses"]]
        log.info("reward: resuming from step %d of %d (%s)", resumed_from, total_steps, checkpoint_folder)
    # No clipping in this stage: 0 keeps DeepSpeed from clipping at its default 1.0.
    model, optimizer_p = dist.prepare_trainable(acc, rm, optimizer, micro_batch_size=max(1, cfg.batch_size // acc.num_processes),
                                                max_grad_norm=0.0)
    if state is not None and deepspeed:
        dist.load_engine_states(checkpoint_folder, {CHECKPOINT_OPTIMIZER: model}, acc)

    def save_progress(step: int) -> None:
        """Checkpoint (collective: the full weights are gathered under ZeRO-3, a DeepSpeed engine's
        partitions are written by every process; the main process writes the rest)."""
        weights = dist.full_state_dict(model, acc)
        staged = dist.stage_engine_states(checkpoint_folder, {CHECKPOINT_OPTIMIZER: model}, acc) if deepspeed else None
        dist.save_on_main(lambda: save_checkpoint(
            checkpoint_folder, models={CHECKPOINT_MODEL: weights},
            optimizers={} if deepspeed else {CHECKPOINT_OPTIMIZER: optimizer},
            state={"step": step, "losses": losses, "fingerprint": fingerprint}, staged=staged),
            acc)

    items = [encode_pairs(tokenizer, [prompt] * len(texts), texts, cfg.max_length) for prompt, texts in items_text]
    forward = pairwise_rewards if loss == "pairwise" else listwise_scores
    progress = StepProgress(f"reward ({loss})", total_steps, initial=resumed_from, enabled=acc.is_main_process)
    for step in progress:
        stop_if_requested(f"reward ({loss})", step, lambda: save_progress(step), checkpoint_folder)
        batch, real = uneven_shard([items[i] for i in _batch_indices(step, len(items), cfg.batch_size, config.seed)],
                                   acc)
        a, b = forward(model, tokenizer, batch)
        total, count = pairwise_loss_sum(a, b) if loss == "pairwise" else listwise_loss_sum(a, b)
        correct = float((a > b).sum()) if loss == "pairwise" else 0.0
        if not real:  # an idle rank runs the same collectives and adds nothing
            total, count, correct = total * 0.0, 0, 0.0
        sums = dist.reduce_sum(torch.tensor([float(total.detach()), float(count), correct], dtype=torch.float64), acc)
        value = float(sums[0]) / max(1.0, float(sums[1]))
        if not math.isfinite(value):
            raise FloatingPointError(f"reward: non-finite loss at step {step + 1}")
        optimizer_p.zero_grad(set_to_none=True)
        acc.backward(dist.global_mean_loss(total, count, acc))
        optimizer_p.step()
        losses.append(value)
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if log_step is not None:
            metrics = {"loss": value}
            if loss == "pairwise":
                metrics["accuracy"] = float(sums[2]) / max(1.0, float(sums[1]))
            log_step(metrics, done)
        if done < total_steps and done % cfg.save_every == 0:
            save_progress(done)
        if on_step is not None:
            on_step(done, losses[-1])
    progress.close()

    model.eval()
    eval_batch = max(cfg.batch_size, 32)
    train_subset = train_pairs
    if len(train_subset) > TRAIN_ACCURACY_MAX_PAIRS:
        pick = _epoch_order(len(train_subset), config.seed, -1)[:TRAIN_ACCURACY_MAX_PAIRS]
        train_subset = [train_subset[i] for i in sorted(pick)]
    with dist.gathered_for_generation(model, acc) as rm:  # full weights on every rank for sharded scoring
        summary = _evaluate_and_normalize(rm, tokenizer, config, train_subset, heldout_pairs, use_noise,
                                          normalize_prompts, normalize_responses, eval_batch, acc)
    summary = {
        "loss": loss,
        "use_noise": use_noise,
        "steps": total_steps,
        "resumed_from_step": resumed_from,
        "epochs": total_steps / per_epoch,
        "train_items": len(items_text),
        "train_pairs": len(train_pairs),
        "train_prompts": len({p.prompt for p in train_pairs} | {t[0] for t in items_text}),
        "heldout_pairs": len(heldout_pairs),
        "heldout_prompts": len(heldout),
        "final_loss": float(np.mean(losses[-10:])),
        "train_accuracy_pairs": len(train_subset),
        **summary,
    }
    # The normaliser was set on every rank's module (buffers are never sharded); the main process saves.
    dist.save_full(model, acc, lambda m: m.save_pretrained(out_folder))
    dist.save_on_main(lambda: discard_checkpoint(checkpoint_folder), acc)
    end_training(acc)
    summary["seconds"] = round(time.monotonic() - started, 3)
    summary.update(stage_cost(summary["seconds"], acc.num_processes))
    summary["model"] = str(out_folder)
    log.info("reward (%s%s): %d steps, final loss %.4f, held-out accuracy %s", loss, " + noise" if use_noise else "",
             total_steps, summary["final_loss"], summary["heldout_accuracy"])
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


def run(config: ExperimentConfig, run: RunDir, resume: bool, ctx: StageContext) -> dict:
    """The reward stage: one reward model per STR variant that has one (``reward/<variant>/model``; none
    for str_direct), trained, or with ``reward.model`` set imported (``reward_import.py``). Collective."""
    sample = run.require("sample")
    sft_model = run.require("sft") / "model"
    prompts, responses = _reference_samples(sample / "ranked.jsonl")

    def train_one(variant: str, stage: str) -> dict:
        settings = VARIANTS[variant]
        if config.reward.model is not None:  # a ready reward model: nothing to train (reward_import.py)
            from selfrank.train.stages.reward_import import import_reward

            summary = import_reward(config, sft_model, sample / "pairs.jsonl", sample / "ranked.jsonl",
                                    run.stage(stage) / "model", use_noise=settings.use_noise,
                                    normalize_prompts=prompts, normalize_responses=responses)
        else:
            summary = train_reward(
                config, sft_model, sample / "pairs.jsonl", sample / "ranked.jsonl", run.stage(stage) / "model",
                loss=settings.loss, use_noise=settings.use_noise, resume=resume,
                normalize_prompts=prompts, normalize_responses=responses,
                log_step=ctx.hooks.stage_log("reward", f"{variant}/"),
            )
        if dist.is_main() and ctx.hooks.wants_tables:  # the sampled answers with this RM's reward filled in
            ctx.hooks.log_table(f"{variant}/answers", scored_groups(config, run.path(stage) / "model",
                                                                     sample / "ranked.jsonl"), "reward")
        return summary

    # Variants without a reward model (str_direct) have nothing to train here: no reward/<variant>/.
    with_rm = [v for v in config.variants if VARIANTS[v].needs_reward_model]
    summary = per_variant(config, run, "reward", train_one, variants=with_rm)
    without = {v: f"no reward model: {v} ranks rollouts directly" for v in config.variants if v not in with_rm}
    if without:
        log.info("reward: %s", "; ".join(without.values()))
        summary["without_reward_model"] = without
    if config.reward.model is not None and with_rm:
        summary["imported_from"] = config.reward.model  # no reward model was trained in this run
    return summary
