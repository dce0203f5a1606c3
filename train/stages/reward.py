"""Reward-model stage: preference data, losses, held-out split, training, normaliser.

The paper trains a GPT-2 reward model on (better, worse) pairs with ``-log sigmoid(r_w - r_l)``
(Adam, lr 3e-5, batch 16, max length 256). Two things differ here on purpose:

* the held-out split is by PROMPT: a prompt (and every group/pair of it) is either trained on or
  held out, never both, so held-out accuracy measures generalisation to unseen questions;
* after training the rewards are normalised (``gain``, ``bias``) so that the reference policy's
  samples score mean 0, std 1, which keeps PPO's reward scale independent of the RM run.

Beyond the paper, ``loss="listwise"`` trains on each group's whole ranked list with the
Plackett-Luce likelihood of its best-first order.

Distributed (``accelerate launch``, see ``train.distributed``): ``reward.batch_size`` is the GLOBAL
batch; its items are split contiguously across ranks (sizes may differ by one) and the update follows
the gradient of the summed per-pair (per-list) loss over the GLOBAL count, so N processes follow one
process's trajectory. Held-out scoring and the normaliser are sharded by example and gathered. Only the
main process writes; checkpoints hold the full weights (gathered under ZeRO-3), loaded into the plain
module before ``prepare`` on every rank; under DeepSpeed the optimizer moments are not checkpointed
(ZeRO partitions them), so only one-process and DDP resumes are exact.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from selfrank.ranking.engine import RankedGroup, stable_seed
from selfrank.errors import UserError
from selfrank.jsonl import read_jsonl

from selfrank.train import dist
from selfrank.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from selfrank.train.config import ExperimentConfig
from selfrank.train.models.causal_lm import load_causal_lm
from selfrank.train.models.reward_model import RewardModel, encode_pairs, model_device, pad_batch, score
from selfrank.train.signals import stop_if_requested
from selfrank.train.dist.stage_setup import begin_training, end_training, stage_cost, uneven_shard

log = logging.getLogger(__name__)

LOSSES = ("pairwise", "listwise")
# Train accuracy is a sanity figure; a fixed subset keeps its cost bounded on large pair files.
TRAIN_ACCURACY_MAX_PAIRS = 2000
NORMALIZER_MIN_STD = 1e-6


# ---- losses (pure) -------------------------------------------------------------------------------
def pairwise_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_w - r_l)``, computed as ``softplus(r_l - r_w)`` (no overflow)."""
    return F.softplus(r_l - r_w).mean()


def pairwise_loss_sum(r_w: torch.Tensor, r_l: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of ``-log sigmoid(r_w - r_l)`` and the number of pairs (for a mean over ranks)."""
    return F.softplus(r_l - r_w).sum(), int(r_w.numel())


def pairwise_accuracy(r_w, r_l) -> float:
    """Fraction of pairs with ``r_w > r_l`` strictly (a tie counts as a miss)."""
    r_w = torch.as_tensor(r_w)
    r_l = torch.as_tensor(r_l)
    if r_w.numel() == 0:
        raise ValueError("pairwise_accuracy of zero pairs")
    return float((r_w > r_l).float().mean())


def listwise_loss(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood of the order given (column 0 best), masked.

    For one list with real items ``s_1..s_n`` in the given order,
    ``NLL = sum_i [logsumexp(s_i..s_n) - s_i]``. Masked entries (padding) take no part in any term.
    The result is the mean NLL over lists with at least two real items (for two items it equals
    ``pairwise_loss``)."""
    total, count = listwise_loss_sum(scores, mask)
    return total / count if count else total


def listwise_loss_sum(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of the Plackett-Luce NLLs of the lists with at least two real items, and their number
    (:func:`listwise_loss` is their mean; a sum over ranks / a global count gives the same mean)."""
    if scores.shape != mask.shape or scores.ndim != 2:
        raise ValueError("scores and mask must both be (groups, items); "
                         f"got {tuple(scores.shape)}, {tuple(mask.shape)}")
    real = mask.to(torch.bool)
    neg_inf = torch.finfo(scores.dtype).min
    masked = scores.masked_fill(~real, neg_inf)
    # logsumexp over each item and every item after it: a reversed cumulative logsumexp.
    tail = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    terms = torch.where(real, tail - scores, torch.zeros_like(scores))
    per_list = terms.sum(dim=-1)
    counted = real.sum(dim=-1) >= 2
    if not bool(counted.any()):
        return scores.sum() * 0.0, 0  # keeps the graph; no list to learn from
    return per_list[counted].sum(), int(counted.sum())


# ---- data ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferencePair:
    group_id: str
    prompt: str
    winner: str
    loser: str
    loser_noised: str | None = None
    noise_kind: str | None = None

    def loser_text(self, use_noise: bool) -> str:
        """The loser to train on: its perturbed version under ``use_noise`` when one exists."""
        return self.loser_noised if use_noise and self.loser_noised is not None else self.loser


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Read ``pairs.jsonl``; every malformed row is a ``UserError`` naming ``file:line``."""
    pairs: list[PreferencePair] = []
    prompt_of: dict[str, str] = {}
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        for key in ("group_id", "prompt", "winner", "loser"):
            if key not in row:
                raise UserError(f"{where}: missing key '{key}'")
        for key in ("prompt", "winner", "loser"):
            if not isinstance(row[key], str):
                raise UserError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
        noised = row.get("loser_noised")
        if noised is not None and not isinstance(noised, str):
            raise UserError(f"{where}: 'loser_noised' must be a string or null, got {type(noised).__name__}")
        group_id = str(row["group_id"])
        if prompt_of.setdefault(group_id, row["prompt"]) != row["prompt"]:
            raise UserError(f"{where}: group_id {group_id!r} appears with two different prompts")
        pairs.append(PreferencePair(group_id, row["prompt"], row["winner"], row["loser"], noised,
                                    row.get("noise_kind")))
    return pairs


def load_ranked(path: str | Path) -> list[RankedGroup]:
    """Read ``ranked.jsonl`` (``RankedGroup.to_json`` rows) with ``file:line`` errors."""
    groups: list[RankedGroup] = []
    for number, row in read_jsonl(path):
        try:
            group = RankedGroup.from_json(row)
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{path}:{number}: {exc}") from None
        n = len(group.responses)
        if any(not 0 <= i < n for i in group.representatives):
            raise UserError(f"{path}:{number}: 'representatives' index out of range for {n} responses")
        groups.append(group)
    return groups


def ranked_lists(groups: Iterable[RankedGroup]) -> list[tuple[str, list[str]]]:
    """``(prompt, texts best first)`` per group: the cluster representatives in TextRank order
    (near-duplicates removed, as for the pairs). Lists of fewer than two texts teach nothing."""
    out = []
    for group in groups:
        texts = [group.responses[i] for i in group.representatives]
        if len(texts) >= 2:
            out.append((group.prompt, texts))
    return out


def heldout_prompts(prompts: Iterable[str], fraction: float, seed: int) -> set[str]:
    """The prompts held out: ``round(fraction * n)`` of the distinct prompts (at least one and at most
    ``n - 1`` when ``fraction > 0`` and ``n >= 2``), chosen by a stable hash of (seed, prompt).

    Deterministic across processes and independent of file order; every group or pair of a prompt
    goes the same way, so no prompt is on both sides."""
    unique = sorted(set(prompts))
    if fraction <= 0 or len(unique) < 2:
        return set()
    count = min(max(1, round(fraction * len(unique))), len(unique) - 1)
    ranked = sorted(unique, key=lambda p: (stable_seed("reward-heldout", seed, p), p))
    return set(ranked[:count])


def split_pairs(pairs: list[PreferencePair],
                heldout: set[str]) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train, held_out)`` by prompt."""
    train = [p for p in pairs if p.prompt not in heldout]
    held = [p for p in pairs if p.prompt in heldout]
    return train, held


def training_items(pairs: list[PreferencePair], groups: list[RankedGroup], heldout: set[str], loss: str,
                   use_noise: bool) -> list[tuple[str, list[str]]]:
    """What the RM trains on, outside the held-out prompts: ``(prompt, [winner, loser])`` per pair
    (the loser perturbed under ``use_noise`` where a perturbation exists) for ``pairwise``; the whole
    best-first list per group for ``listwise`` (noise decorates pairs only, so it does not apply)."""
    if loss == "pairwise":
        return [(p.prompt, [p.winner, p.loser_text(use_noise)]) for p in pairs if p.prompt not in heldout]
    if loss == "listwise":
        return [(prompt, texts) for prompt, texts in ranked_lists(groups) if prompt not in heldout]
    raise UserError(f"reward loss: must be one of {', '.join(LOSSES)}; got {loss!r}")


# ---- batching ---------------------------------------------------------------------------------
def _rewards(rm: RewardModel, tokenizer, batch: list[list[list[int]]]) -> torch.Tensor:
    """Raw rewards of every sequence of every item, flattened in order, in one forward pass."""
    flat = [ids for item in batch for ids in item]
    ids, mask = pad_batch(flat, tokenizer.pad_token_id, tokenizer.padding_side or "left")
    device = model_device(rm)
    return rm(ids.to(device), mask.to(device))


def _pairwise_rewards(rm: RewardModel, tokenizer,
                      batch: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_w, r_l)`` for a batch of ``[winner_ids, loser_ids]`` items."""
    rewards = _rewards(rm, tokenizer, batch)
    return rewards[0::2], rewards[1::2]


def _listwise_scores(rm: RewardModel, tokenizer,
                     batch: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of every text of every list, laid out ``(groups, max_items)`` with a mask."""
    rewards = _rewards(rm, tokenizer, batch)
    width = max(len(item) for item in batch)
    scores = torch.zeros((len(batch), width), dtype=rewards.dtype, device=rewards.device)
    item_mask = torch.zeros((len(batch), width), dtype=torch.bool, device=rewards.device)
    offset = 0
    for row, item in enumerate(batch):
        scores[row, :len(item)] = rewards[offset:offset + len(item)]
        item_mask[row, :len(item)] = True
        offset += len(item)
    return scores, item_mask


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


def _checkpoint_state(folder: Path, fingerprint: dict) -> dict | None:
    """The saved state of a resumable checkpoint, or None; refuses one made with other settings."""
    found = find_checkpoint(folder)
    if found is None:
        return None
    state = json.loads((found / "state.json").read_text(encoding="utf-8"))
    if state.get("fingerprint") != fingerprint:
        raise UserError(f"{folder}: the checkpoint was made with other reward settings or data; "
                        "run again without resume to start over")
    return state


def _remove_checkpoint(folder: Path) -> None:
    for path in (folder, folder.with_name(folder.name + ".old"), folder.with_name(folder.name + ".new")):
        shutil.rmtree(path, ignore_errors=True)


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


class _StateOnly:
    """A saved state dict posing as a module for ``train.checkpoint`` (the full weights of a sharded model)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


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

    state = _checkpoint_state(checkpoint_folder, fingerprint) if resume else None
    if state is None:
        if find_checkpoint(checkpoint_folder) is not None:
            log.info("reward: discarding the old checkpoint %s (not resuming)", checkpoint_folder)
        _remove_checkpoint(checkpoint_folder)
    torch.manual_seed(config.seed)
    rm = _fresh_model(config, sft_folder)
    tokenizer = rm.tokenizer
    if tokenizer is None or tokenizer.pad_token_id is None:
        raise UserError(f"{sft_folder}: the tokenizer needs a pad token for reward-model batches")
    rm.train()
    optimizer = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=0.0)
    resumed_from, losses = 0, []
    if state is not None:
        # Into the plain module and torch optimizer, before prepare, on every rank.
        optimizers = {CHECKPOINT_OPTIMIZER: optimizer} if state.get("optimizer_saved", True) else {}
        if not optimizers:
            log.warning("reward: the checkpoint has no optimizer state (saved under DeepSpeed): it restarts")
        load_checkpoint(checkpoint_folder, models={CHECKPOINT_MODEL: rm}, optimizers=optimizers)
        resumed_from, losses = int(state["step"]), [float(x) for x in state["losses"]]
        log.info("reward: resuming from step %d of %d (%s)", resumed_from, total_steps, checkpoint_folder)
    acc = begin_training(1, max(1, cfg.batch_size // dist.world_size()))
    # No clipping in this stage: 0 keeps DeepSpeed from clipping at its default 1.0.
    model, optimizer_p = dist.prepare_trainable(acc, rm, optimizer, micro_batch_size=max(1, cfg.batch_size // acc.num_processes),
                                                max_grad_norm=0.0)

    def save_progress(step: int) -> None:
        """Checkpoint (collective: the full weights are gathered under ZeRO-3; the main process writes)."""
        weights = dist.full_state_dict(model, acc)
        partitioned = dist.uses_deepspeed(acc)  # a ZeRO optimizer has no full state on one rank
        dist.save_on_main(lambda: save_checkpoint(
            checkpoint_folder, models={CHECKPOINT_MODEL: _StateOnly(weights)},
            optimizers={} if partitioned else {CHECKPOINT_OPTIMIZER: optimizer},
            state={"step": step, "losses": losses, "fingerprint": fingerprint, "optimizer_saved": not partitioned}),
            acc)

    items = [encode_pairs(tokenizer, [prompt] * len(texts), texts, cfg.max_length) for prompt, texts in items_text]
    forward = _pairwise_rewards if loss == "pairwise" else _listwise_scores
    show = sys.stderr.isatty() and acc.is_main_process
    progress = tqdm(range(resumed_from, total_steps), desc=f"reward ({loss})", disable=not show,
                    initial=resumed_from, total=total_steps)
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
    dist.save_on_main(lambda: _remove_checkpoint(checkpoint_folder), acc)
    end_training(acc)
    summary["seconds"] = round(time.monotonic() - started, 3)
    summary.update(stage_cost(summary["seconds"], acc.num_processes))
    summary["model"] = str(out_folder)
    log.info("reward (%s%s): %d steps, final loss %.4f, held-out accuracy %s", loss, " + noise" if use_noise else "",
             total_steps, summary["final_loss"], summary["heldout_accuracy"])
    return summary
