"""SFT stage: supervised fine-tuning of the policy on the task's answers (full / LoRA / BitFit / adapter).

The loss covers only the answer tokens and the EOS (prompt tokens are labelled -100), averaged over all
answer tokens of an optimizer step. Training is seeded and resumable: every ``sft.save_every`` steps the
trainable weights, optimizer, scheduler and RNG states go to ``<out>/checkpoint/``; the data order is a
pure function of the seed and the step, so a resumed run continues exactly where it stopped.

Distributed (``accelerate launch``, DDP or DeepSpeed ZeRO, see ``train.dist``): ``sft.batch_size``
is the GLOBAL batch; each step's examples are split contiguously across ranks (each used once), and
the update follows the gradient of the summed answer-token loss over the GLOBAL token count, so N
processes follow one process's trajectory. Only the main process writes (model, summary, checkpoint);
a checkpoint holds the full trainable weights (gathered under ZeRO-3), loaded into the plain module
before ``prepare`` on every rank, and the optimizer state: a torch optimizer's whole, or under
DeepSpeed the engine's partitions, written by every process and restored into the prepared engine
(``train/dist/engine_state.py``), so resumes are exact everywhere. LoRA under ZeRO-3 is refused (saving merges LoRA in place, which sharded weights do not allow; LoRA's
few trainable weights gain nothing from ZeRO-3: use ZeRO-2 or DDP).

Folder layout (``out`` = ``sft/`` for the main method, ``sft/baselines/<method>/`` for baselines):
``out/model/`` (a plain causal-LM folder), ``out/train_summary.json``, ``out/checkpoint/`` while training.
``sft/original/`` holds the untrained policy, evaluated as the "original" row.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import get_linear_schedule_with_warmup

from selfrank.atomic import atomic_folder, write_json
from selfrank.errors import UserError

from selfrank.train import dist
from selfrank.train.checkpoint import (
    check_fingerprint,
    discard_checkpoint,
    find_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from selfrank.train.models import peft_methods
from selfrank.train.config import ExperimentConfig, PromptFormat, SFTConfig
from selfrank.train.data.examples import TaskData
from selfrank.train.data.prompts import format_task, prompt_markers, tokenizer_texts
from selfrank.train.data.tasks import load_task
from selfrank.train.models.causal_lm import encode_prompt_response, init_policy, load_model, save_model
from selfrank.train.rundir import RunDir
from selfrank.train.scale import apply_model_switches
from selfrank.train.progress import StepProgress
from selfrank.train.signals import stop_if_requested
from selfrank.train.stages.context import StageContext
from selfrank.train.dist.stage_setup import begin_training, end_training, micro_batches, stage_cost

log = logging.getLogger(__name__)

SUMMARY = "train_summary.json"
CHECKPOINT = "checkpoint"
ENGINE = "optimizer"  # the DeepSpeed engine's state in a checkpoint (deepspeed/optimizer/)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite (a learning rate too high for the method)."""


def is_main_process() -> bool:
    return dist.is_main()


def tokenize_examples(examples, tokenizer, block_size: int) -> list[tuple[list[int], int]]:
    """``(ids, prompt_len)`` per example, at most ``block_size`` tokens (marker prompts cut from the left;
    chat prompts, fitted to their budget when formatted, keep every token and long answers are cut)."""
    limit = block_size
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 8 <= model_max < limit:
        limit = model_max
    return [encode_prompt_response(tokenizer, ex.prompt, ex.target, limit) for ex in examples]


def collate(features: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on the prompt and on padding."""
    width = max(len(ids) for ids, _ in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(features):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def answer_token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled (answer) positions, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, int((shift_labels != -100).sum())


def example_order(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the examples of optimizer step ``step``: a fresh seeded permutation every epoch."""
    out = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset:offset + take])
        position += take
    return out


def total_steps(n_examples: int, config: ExperimentConfig, baseline: bool = False) -> int:
    """Optimizer steps of the main method (or of a baseline: ``sft.baseline_max_steps`` when set)."""
    if baseline and config.sft.baseline_max_steps is not None:
        return config.sft.baseline_max_steps
    if config.sft.max_steps is not None:
        return config.sft.max_steps
    return max(1, math.ceil(config.sft.epochs * n_examples / config.sft.batch_size))


def check_batch_layout(sft: SFTConfig, world: int) -> None:
    """The global batch splits evenly across ``world`` processes (``shard_batch``), and each process's
    share fills ``grad_accum`` micro-batches (``micro_batches``); checked before any stage runs."""
    if sft.batch_size % world:
        raise UserError(f"sft.batch_size: {sft.batch_size} examples cannot be split evenly across {world} "
                        f"processes; use a multiple of {world}")
    if sft.batch_size // world < sft.grad_accum:
        raise UserError(f"sft.grad_accum: {sft.batch_size // world} examples per process cannot fill "
                        f"{sft.grad_accum} accumulation steps on {world} processes; lower sft.grad_accum or "
                        "raise sft.batch_size")


# ----------------------------------------------------------------------------------------------- checkpoints

def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    # named_parameters() lists a tied weight once, so the dict never holds two views of one tensor.
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------- training

def _finished(out_folder: Path, method: str) -> dict | None:
    """The summary of a training that already wrote its model to ``out_folder``, else None."""
    summary_path = out_folder / SUMMARY
    if summary_path.is_file() and (out_folder / "model").is_dir():
        log.info("sft %s: already trained (%s)", method, out_folder)
        return json.loads(summary_path.read_text())
    return None


def train_sft(config: ExperimentConfig, data: TaskData, model, tokenizer, method: str, out_folder: Path,
              resume: bool = False, *, stop_after: int | None = None,
              log_step: Callable[[dict, int], None] | None = None, lr: float | None = None) -> dict:
    """Fine-tune ``model`` with ``method`` on ``data.train``; save ``out_folder/model``; return a summary.

    Collective under a launcher: every rank calls it with the same arguments (the model on CPU or its
    device; it is placed by ``prepare``). ``stop_after`` ends the loop after that many steps *without* a
    final checkpoint or model, exactly as a killed job would (used to test resume). ``log_step(metrics,
    step)`` receives each step's global loss and learning rate (every rank; the caller decides who logs).
    ``lr``: the peak learning rate (default: ``sft.method_lr`` or ``sft.lr``).
    """
    out_folder = Path(out_folder)
    summary_path = out_folder / SUMMARY
    finished = _finished(out_folder, method) if resume else None
    if finished is not None:
        return finished
    data = format_task(data, tokenizer, config)  # chat policies read chat prompts
    sft = config.sft
    lr = sft.lr_for(method) if lr is None else lr
    started = time.time()
    module = peft_methods.prepare(model, method, sft)
    trainable = peft_methods.trainable_parameters(module)
    n = len(data.train)
    steps = 0 if method == "none" else total_steps(n, config, baseline=method != sft.method)
    summary = {"method": method, "steps": steps, "lr": lr, "trainable_params": trainable,
               "total_params": sum(p.numel() for p in module.parameters()), "examples": n}
    if steps == 0:
        acc = dist.get_accelerator()
        dist.save_on_main(lambda: save_model(module, tokenizer, out_folder / "model"), acc)
        summary.update(loss_first=None, loss_final=None, seconds=round(time.time() - started, 3))
        dist.save_on_main(lambda: write_json(summary_path, summary), acc)
        return summary

    per_rank = sft.batch_size // max(1, dist.world_size())
    acc = begin_training(sft.grad_accum, max(1, per_rank // sft.grad_accum), config.model.mixed_precision)
    deepspeed = dist.uses_deepspeed(acc)
    apply_model_switches(module, config.model)
    if dist.zero_stage(acc) == 3 and method == "lora":
        raise UserError("sft.method: 'lora' is not supported under DeepSpeed ZeRO-3 (saving merges LoRA into "
                        "weights that ZeRO-3 shards); use ZeRO-2 or plain DDP for LoRA")
    features = tokenize_examples(data.train, tokenizer, sft.block_size)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=sft.weight_decay)
    # Stepped by hand once per optimizer step (accelerate's scheduler wrapper would step it per process).
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(sft.warmup_ratio * steps), steps)
    meta = {"method": method, "steps": steps, "batch_size": sft.batch_size, "seed": config.seed, "examples": n}
    checkpoint = out_folder / CHECKPOINT
    start = 0
    state = read_state(checkpoint) if resume else None
    if state is not None:
        check_fingerprint(state, meta, checkpoint, f"sft ({method})")
        # A torch optimizer loads here; a DeepSpeed engine's partitions once it is prepared (below).
        load_checkpoint(checkpoint, models={"trainable": _trainable(module)},
                        optimizers={"scheduler": scheduler} if deepspeed else {"scheduler": scheduler, "optimizer": optimizer})
        start = int(state["step"])
        log.info("sft %s: resuming at step %d/%d", method, start, steps)
        if acc.process_index:  # the checkpoint holds the main process's stream; others keep their own
            torch.manual_seed(dist.per_rank_seed(config.seed + start, acc))
    else:
        if find_checkpoint(checkpoint) is not None:
            log.info("sft %s: discarding the old checkpoint %s (not resuming)", method, checkpoint)
        dist.save_on_main(lambda: discard_checkpoint(checkpoint), acc)
        torch.manual_seed(dist.per_rank_seed(config.seed, acc))
    model_p, optimizer_p = dist.prepare_trainable(acc, module, optimizer, micro_batch_size=max(1, per_rank // sft.grad_accum),
                                                  max_grad_norm=sft.max_grad_norm)
    if state is not None and deepspeed:
        dist.load_engine_states(checkpoint, {ENGINE: model_p}, acc)
    device = acc.device
    losses: list[float] = []
    model_p.train()
    bar = StepProgress(f"sft {method}", steps, initial=start, enabled=acc.is_main_process)
    for step in range(start, steps):
        if stop_after is not None and step >= stop_after:
            bar.close()
            end_training(acc)
            return {**summary, "stopped_at": step}
        stop_if_requested(f"sft {method}", step, lambda: _save_progress(checkpoint, model_p, optimizer, scheduler, step,
                                                                        meta, acc), checkpoint)
        indices = dist.shard_batch(example_order(n, step, sft.batch_size, config.seed), acc)
        rank_tokens = sum(_labelled(features[i]) for i in indices)
        step_loss = torch.zeros((), dtype=torch.float64)
        lr = scheduler.get_last_lr()[0]
        for chunk in micro_batches(indices, acc.gradient_accumulation_steps, "sft.batch_size"):
            batch = {k: v.to(device) for k, v in collate([features[i] for i in chunk], tokenizer.pad_token_id).items()}
            with acc.accumulate(model_p):
                loss_sum, _ = answer_token_loss_sum(model_p, batch)
                acc.backward(dist.global_mean_loss(loss_sum, rank_tokens, acc))
                if acc.sync_gradients and sft.max_grad_norm > 0:
                    acc.clip_grad_norm_(model_p.parameters(), sft.max_grad_norm)  # DeepSpeed: clips in step
                optimizer_p.step()
                optimizer_p.zero_grad(set_to_none=True)
            step_loss += loss_sum.detach().double().cpu()
        scheduler.step()
        global_tokens = float(dist.reduce_sum(float(rank_tokens), acc))
        loss = float(dist.reduce_sum(step_loss, acc)) / max(1.0, global_tokens)
        if not math.isfinite(loss):
            bar.close()
            end_training(acc)
            raise NonFiniteLoss(f"sft {method}: non-finite loss at step {step} at learning rate {lr:g} (lower it?)")
        losses.append(loss)
        if log_step is not None:
            log_step({"loss": loss, "lr": lr}, step + 1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
        done = step + 1
        if done % sft.save_every == 0 and done < steps:
            _save_progress(checkpoint, model_p, optimizer, scheduler, done, meta, acc)
    bar.close()

    dist.save_full(model_p, acc, lambda m: save_model(m, tokenizer, out_folder / "model"))
    end_training(acc)
    tail = losses[-max(1, len(losses) // 10):]
    seconds = round(time.time() - started, 3)
    summary.update(loss_first=losses[0] if losses else None, loss_final=sum(tail) / len(tail) if tail else None,
                   resumed_from=start, seconds=seconds, loss_curve=_curve(losses, 50, start),
                   **stage_cost(seconds, acc.num_processes))

    def finish() -> None:
        write_json(summary_path, summary)
        discard_checkpoint(checkpoint)

    dist.save_on_main(finish, acc)
    log.info("sft %s: %d steps, loss %.4f -> %.4f, %d trainable params", method, steps,
             summary["loss_first"] or float("nan"), summary["loss_final"] or float("nan"), trainable)
    return summary


# ----------------------------------------------------------------------------------------------- learning rate

LR_SEARCH = "lr_search"


def candidate_folder(out_folder: Path, lr: float) -> Path:
    """Where ``sft.lr_search`` trains the candidate at ``lr`` (its own model, summary and checkpoint)."""
    return Path(out_folder) / LR_SEARCH / f"lr={lr:g}"


def validation_loss(model, tokenizer, examples, block_size: int, batch_size: int) -> float:
    """Mean answer-token cross-entropy of ``model`` on ``examples``: the SFT loss, without gradients."""
    features = tokenize_examples(examples, tokenizer, block_size)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = collate(features[start:start + batch_size], tokenizer.pad_token_id)
            loss, n = answer_token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            total += float(loss)
            count += n
    return total / max(1, count)


def choose_lr(tried: list[dict]) -> dict:
    """The candidate with the lowest validation loss (the first listed among equals); diverged ones lose."""
    finite = [t for t in tried if t.get("validation_loss") is not None]
    if not finite:
        rates = ", ".join(f"{t['lr']:g}" for t in tried)
        raise UserError(f"sft.lr_search: every learning rate ({rates}) gave a non-finite training loss; "
                        "try smaller ones")
    return min(finite, key=lambda t: t["validation_loss"])


def train_with_lr_search(config: ExperimentConfig, data: TaskData, original: Path, method: str, out_folder: Path,
                         resume: bool = False, *, log_step: Callable[[dict, int], None] | None = None) -> dict:
    """Train ``method`` from ``original`` once per rate ``sft.lr_search`` gives it; keep the lowest
    validation loss.

    Each candidate is an ordinary resumable SFT run in ``candidate_folder``; its validation loss (the
    task's validation split, as formatted for the model) joins its summary, so a resumed search skips the
    candidates it has scored. The winner's model is copied to ``out_folder/model`` and the summary lists
    every candidate; the losers' models are then removed (their summaries stay). Collective."""
    out_folder = Path(out_folder)
    summary_path = out_folder / SUMMARY
    finished = _finished(out_folder, method) if resume else None
    if finished is not None:
        return finished
    if not data.validation:
        raise UserError("sft.lr_search: the task has no validation examples to choose a learning rate on "
                        "(set task.validation, or give sft.lr / sft.method_lr instead)")
    acc = dist.get_accelerator()
    tried, examples = [], None
    for lr in config.sft.candidates_for(method):
        folder = candidate_folder(out_folder, lr)
        known = folder / SUMMARY
        result = json.loads(known.read_text()) if resume and known.is_file() else None
        if result is None or not (result.get("diverged") or "validation_loss" in result):
            model, tokenizer = load_model(original, config.model)
            try:
                # Each candidate logs its own curve: [<method>/]lr=<rate>/loss.
                hook = None if log_step is None else (
                    lambda metrics, step, lr=lr: log_step({f"lr={lr:g}/{k}": v for k, v in metrics.items()}, step))
                result = train_sft(config, data, model, tokenizer, method, folder, resume, log_step=hook, lr=lr)
            except NonFiniteLoss as exc:
                log.warning("%s", exc)
                result = {"method": method, "lr": lr, "diverged": True, "validation_loss": None}
            del model
            if not result.get("diverged"):
                trained, tokenizer = load_model(folder / "model", config.model)
                if examples is None:  # every candidate shares the original's tokenizer: formatted once
                    examples = format_task(dataclasses.replace(data, train=[], test=[]), tokenizer, config).validation
                result["validation_loss"] = validation_loss(trained.to(acc.device), tokenizer, examples,
                                                            config.sft.block_size, config.sft.batch_size)
                del trained
            dist.save_on_main(lambda result=result, known=known: write_json(known, result), acc)
        tried.append(result)
        log.info("sft %s: learning rate %g, validation loss %s", method, lr,
                 "diverged" if result.get("diverged") else f"{result['validation_loss']:.4f}")
    best = choose_lr(tried)
    seconds = round(sum(t.get("seconds") or 0.0 for t in tried), 3)
    summary = {**best, "seconds": seconds, **stage_cost(seconds, acc.num_processes),
               "validation_examples": len(data.validation),
               "lr_search": [{"lr": t["lr"], "validation_loss": t.get("validation_loss"),
                              "loss_final": t.get("loss_final"), "seconds": t.get("seconds")} for t in tried]}
    summary.pop("loss_curve", None)

    def finish() -> None:
        with atomic_folder(out_folder / "model") as tmp:
            shutil.copytree(candidate_folder(out_folder, best["lr"]) / "model", tmp, dirs_exist_ok=True)
        write_json(summary_path, summary)
        for t in tried:
            shutil.rmtree(candidate_folder(out_folder, t["lr"]) / "model", ignore_errors=True)

    dist.save_on_main(finish, acc)
    log.info("sft %s: learning rate %g chosen on %d validation examples (loss %.4f)", method, best["lr"],
             len(data.validation), best["validation_loss"])
    return summary


def _save_progress(folder: Path, model, optimizer, scheduler, step: int, meta: dict, acc) -> None:
    """Checkpoint from the main process: full trainable weights (gathered under ZeRO-3; collective)."""
    names = set(_trainable(dist.unwrap(model, acc)))
    state = dist.full_state_dict(model, acc)
    # A DeepSpeed optimizer is partitioned: every process writes its part first (collective); a plain
    # torch one is the same on every rank, and the main process saves it whole.
    staged = dist.stage_engine_states(folder, {ENGINE: model}, acc) if dist.uses_deepspeed(acc) else None
    optimizers = {"scheduler": scheduler} if staged is not None else {"scheduler": scheduler, "optimizer": optimizer}
    dist.save_on_main(lambda: save_checkpoint(folder, models={"trainable": {k: state[k] for k in sorted(names)}},
                                              optimizers=optimizers, state={"step": step, "fingerprint": meta},
                                              staged=staged), acc)


def _labelled(feature: tuple[list[int], int]) -> int:
    ids, prompt_len = feature
    # Labels start at prompt_len; the first token has no prediction, so a 0-length prompt loses one.
    return len(ids) - max(prompt_len, 1)


def _curve(losses: list[float], points: int, start: int) -> list[list[float]]:
    if not losses:
        return []
    every = max(1, len(losses) // points)
    return [[start + i + 1, round(losses[i], 5)] for i in range(0, len(losses), every)]


# ----------------------------------------------------------------------------------------------- stage

def training_texts(data: TaskData, fmt: PromptFormat | None = None) -> list[str]:
    """What the tiny tokenizer is trained on: the training prompts and answers (never eval text)."""
    return tokenizer_texts(data, fmt or PromptFormat())


def run(config: ExperimentConfig, run: RunDir, resume: bool, ctx: StageContext | None = None) -> dict:
    """The SFT stage: save the untrained policy, then train the main method and each baseline.

    Collective under a launcher: the main process builds and saves the untrained policy, every rank
    loads it. The main method's metrics are logged as ``loss``/``lr``, a baseline's as
    ``<method>/loss``/``<method>/lr``."""
    log_step = (ctx or StageContext()).hooks.stage_log("sft")
    stage = run.stage("sft")
    data = load_task(config.task)
    original = stage / "original"
    torch.manual_seed(config.seed)
    acc = dist.get_accelerator()

    def build_original() -> None:
        model, tokenizer = init_policy(config.model, training_texts(data, config.task.prompt),
                                       prompt_markers(config.task.prompt), style=config.task.prompt.style)
        save_model(model, tokenizer, original)

    if not (resume and (original / "config.json").is_file()):
        dist.save_on_main(build_original, acc)
    jobs = [(config.sft.method, stage)]
    jobs += [(b, stage / "baselines" / b) for b in dict.fromkeys(config.sft.baselines) if b != config.sft.method]
    results = {}
    for method, out in jobs:
        prefix = "" if method == config.sft.method else f"{method}/"
        hook = None if log_step is None else (
            lambda metrics, step, prefix=prefix: log_step({prefix + k: v for k, v in metrics.items()}, step))
        if config.sft.candidates_for(method) and method != "none":
            results[method] = train_with_lr_search(config, data, original, method, out, resume, log_step=hook)
            continue
        model, tokenizer = load_model(original, config.model)
        results[method] = train_sft(config, data, model, tokenizer, method, out, resume, log_step=hook)
        del model
    return {"method": config.sft.method, "model": "sft/model", "original": "sft/original",
            "baselines": {m: f"sft/baselines/{m}/model" for m, _ in jobs[1:]}, "runs": results}
