"""SFT stage: supervised fine-tuning of the policy on the task's answers (full / LoRA / BitFit / adapter).

The loss covers only the answer tokens and the EOS (prompt tokens are labelled -100), averaged over all
answer tokens of an optimizer step. Training is seeded and resumable: every ``sft.save_every`` steps the
trainable weights, optimizer, scheduler and RNG states go to ``<out>/checkpoint/``; the data order is a
pure function of the seed and the step, so a resumed run continues exactly where it stopped.

Folder layout (``out`` = ``sft/`` for the main method, ``sft/baselines/<method>/`` for baselines):
``out/model/`` (a plain causal-LM folder), ``out/train_summary.json``, ``out/checkpoint/`` while training.
``sft/original/`` holds the untrained policy, evaluated as the "original" row.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ranking.atomic import write_json
from ranking.errors import UserError

from . import peft_methods
from .config import ExperimentConfig
from .data import TaskData, load_task, prompt_markers
from .models import atomic_folder, encode_prompt_response, init_policy, load_model, save_model
from .rundir import RunDir

log = logging.getLogger(__name__)

SUMMARY = "train_summary.json"
CHECKPOINT = "checkpoint"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def tokenize_examples(examples, tokenizer, block_size: int) -> list[tuple[list[int], int]]:
    """``(ids, prompt_len)`` per example, at most ``block_size`` tokens (prompt cut from the left)."""
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


def total_steps(n_examples: int, config: ExperimentConfig) -> int:
    if config.sft.max_steps is not None:
        return config.sft.max_steps
    return max(1, math.ceil(config.sft.epochs * n_examples / config.sft.batch_size))


# ----------------------------------------------------------------------------------------------- checkpoints

def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    # named_parameters() lists a tied weight once, so the dict never holds two views of one tensor.
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, module, optimizer, scheduler, step: int, meta: dict) -> None:
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in _trainable(module).items()},
                  str(tmp / "trainable.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
                   tmp / "state.pt")
        write_json(tmp / "progress.json", {"step": step, **meta})


def load_checkpoint(folder: Path, module, optimizer, scheduler, meta: dict) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the step to continue from."""
    progress = json.loads((folder / "progress.json").read_text())
    for key, value in meta.items():
        if progress.get(key) != value:
            raise UserError(f"{folder}: checkpoint was made with {key}={progress.get(key)!r}, now {value!r}; "
                            "rerun without resume (or with --force) to start over")
    weights = load_file(str(folder / "trainable.safetensors"))
    params = _trainable(module)
    if set(weights) != set(params):
        raise UserError(f"{folder}: checkpoint weights do not match the model being trained")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(progress["step"])


# ----------------------------------------------------------------------------------------------- training

def train_sft(config: ExperimentConfig, data: TaskData, model, tokenizer, method: str, out_folder: Path,
              resume: bool = False, *, stop_after: int | None = None) -> dict:
    """Fine-tune ``model`` with ``method`` on ``data.train``; save ``out_folder/model``; return a summary.

    ``stop_after`` ends the loop after that many steps *without* a final checkpoint or model, exactly as a
    killed job would (used to test resume).
    """
    out_folder = Path(out_folder)
    summary_path = out_folder / SUMMARY
    if resume and summary_path.is_file() and (out_folder / "model").is_dir():
        log.info("sft %s: already trained (%s)", method, out_folder)
        return json.loads(summary_path.read_text())
    sft = config.sft
    started = time.time()
    module = peft_methods.prepare(model, method, sft)
    trainable = peft_methods.trainable_parameters(module)
    n = len(data.train)
    steps = 0 if method == "none" else total_steps(n, config)
    summary = {"method": method, "steps": steps, "trainable_params": trainable,
               "total_params": sum(p.numel() for p in module.parameters()), "examples": n}
    if steps == 0:
        save_model(module, tokenizer, out_folder / "model")
        summary.update(loss_first=None, loss_final=None, seconds=round(time.time() - started, 3))
        write_json(summary_path, summary)
        return summary

    features = tokenize_examples(data.train, tokenizer, sft.block_size)
    device = next(module.parameters()).device
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=sft.lr, weight_decay=sft.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(sft.warmup_ratio * steps), steps)
    meta = {"method": method, "steps": steps, "batch_size": sft.batch_size, "seed": config.seed, "examples": n}
    checkpoint = out_folder / CHECKPOINT
    start = 0
    if resume and (checkpoint / "progress.json").is_file():
        start = load_checkpoint(checkpoint, module, optimizer, scheduler, meta)
        log.info("sft %s: resuming at step %d/%d", method, start, steps)
    else:
        torch.manual_seed(config.seed)
    losses: list[float] = []
    micro = math.ceil(sft.batch_size / sft.grad_accum)
    module.train()
    bar = tqdm(total=steps, initial=start, desc=f"sft {method}", unit="step",
               disable=not (is_main_process() and sys.stderr.isatty()))
    for step in range(start, steps):
        if stop_after is not None and step >= stop_after:
            bar.close()
            return {**summary, "stopped_at": step}
        indices = example_order(n, step, sft.batch_size, config.seed)
        chunks = [indices[i:i + micro] for i in range(0, len(indices), micro)]
        n_tokens = max(1, sum(_labelled(features[i]) for i in indices))
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for chunk in chunks:
            batch = {k: v.to(device) for k, v in collate([features[i] for i in chunk], tokenizer.pad_token_id).items()}
            loss_sum, _ = answer_token_loss_sum(module, batch)
            (loss_sum / n_tokens).backward()
            step_loss += loss_sum.item()
        if not math.isfinite(step_loss):
            raise RuntimeError(f"sft {method}: non-finite loss at step {step} (lower sft.lr?)")
        if sft.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, sft.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(step_loss / n_tokens)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if done % sft.save_every == 0 and done < steps:
            save_checkpoint(checkpoint, module, optimizer, scheduler, done, meta)
    bar.close()

    save_model(module, tokenizer, out_folder / "model")
    tail = losses[-max(1, len(losses) // 10):]
    summary.update(loss_first=losses[0] if losses else None, loss_final=sum(tail) / len(tail) if tail else None,
                   resumed_from=start, seconds=round(time.time() - started, 3),
                   loss_curve=_curve(losses, 50, start))
    write_json(summary_path, summary)
    shutil.rmtree(checkpoint, ignore_errors=True)
    log.info("sft %s: %d steps, loss %.4f -> %.4f, %d trainable params", method, steps,
             summary["loss_first"] or float("nan"), summary["loss_final"] or float("nan"), trainable)
    return summary


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

def training_texts(data: TaskData) -> list[str]:
    """What the tiny tokenizer is trained on: the training prompts and answers (never eval text)."""
    return [f"{ex.prompt} {ex.target}" for ex in data.train]


def run(config: ExperimentConfig, run: RunDir, resume: bool) -> dict:
    """The SFT stage: save the untrained policy, then train the main method and each baseline."""
    stage = run.stage("sft")
    data = load_task(config.task)
    original = stage / "original"
    torch.manual_seed(config.seed)
    if not (resume and (original / "config.json").is_file()):
        model, tokenizer = init_policy(config.model, training_texts(data), prompt_markers(config.task.prompt))
        save_model(model, tokenizer, original)
        del model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    jobs = [(config.sft.method, stage)]
    jobs += [(b, stage / "baselines" / b) for b in dict.fromkeys(config.sft.baselines) if b != config.sft.method]
    results = {}
    for method, out in jobs:
        model, tokenizer = load_model(original, config.model)
        model.to(device)
        results[method] = train_sft(config, data, model, tokenizer, method, out, resume)
        del model
    return {"method": config.sft.method, "model": "sft/model", "original": "sft/original",
            "baselines": {m: f"sft/baselines/{m}/model" for m, _ in jobs[1:]}, "runs": results}
