"""Worker for tests/train/test_distributed.py: trains a tiny GPT-2 on one fixed global batch.

Run with no launcher (one process) or under ``accelerate launch`` (DDP or DeepSpeed). Every rank runs
the same code through ``train.dist``; rank 0 writes ``result.json`` (per-step global losses and
checks) and ``tensors.safetensors`` (logits) into ``--out``. Under ZeRO-3 it also saves ``model/``.

``--fail kill`` makes rank 1 SIGKILL itself after the first step; ``--fail stall`` makes it sleep
instead (the other rank must then fail by the process-group timeout).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from selfrank.train import dist as dist  # noqa: E402
from selfrank.train.config import TinyModelConfig  # noqa: E402
from selfrank.train.sampling.generation import generate  # noqa: E402
from selfrank.train.models.causal_lm import build_tiny_model, save_model, train_bpe_tokenizer  # noqa: E402
from selfrank.train.models.reward_model import disable_dropout  # noqa: E402

TEXTS = [
    "the cat sat on the mat",
    "a dog ran after the ball in the park while the children laughed",
    "rain",
    "she reads a book every night before sleeping",
    "the quick brown fox jumps over the lazy dog again and again and again",
    "hello world",
    "numbers like one two three four five six seven",
    "we go home now",
]
PROMPTS = ["the cat", "a dog ran", "hello", "she reads a"]
TINY = TinyModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=300)


def build(seed: int):
    """Tokenizer (deterministic training) and a seeded tiny GPT-2 without dropout."""
    tokenizer = train_bpe_tokenizer(TEXTS * 4, TINY.vocab_size)
    torch.manual_seed(seed)
    model = build_tiny_model(TINY, tokenizer)
    disable_dropout(model)
    return model, tokenizer


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def token_sum_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


def probe_inputs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    return right_pad([tokenizer(t)["input_ids"] for t in TEXTS[:2]], tokenizer.pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--optim", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--fail", choices=("none", "kill", "stall"), default="none")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    acc = dist.get_accelerator(args.grad_accum)
    gas = acc.gradient_accumulation_steps
    model, tokenizer = build(seed=0)
    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in TEXTS]
    shard = dist.shard_batch(rows, acc)
    if len(shard) % gas:
        raise SystemExit(f"shard of {len(shard)} not divisible by {gas} accumulation steps")
    micro = len(shard) // gas
    optimizer = (torch.optim.SGD(model.parameters(), lr=args.lr) if args.optim == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=args.lr))
    model, optimizer = dist.prepare_trainable(acc, model, optimizer, micro_batch_size=micro,
                                              max_grad_norm=args.max_grad_norm)
    model.train()

    def train_step() -> float:
        """One optimizer step on the global batch; returns the global token-mean loss."""
        rank_tokens = sum(len(r) - 1 for r in shard)
        step_sum = torch.zeros((), dtype=torch.float64)
        for m in range(gas):
            ids, mask = right_pad(shard[m * micro:(m + 1) * micro], tokenizer.pad_token_id)
            with acc.accumulate(model):
                logits = model(input_ids=ids.to(acc.device), attention_mask=mask.to(acc.device)).logits
                loss_sum, _ = token_sum_loss(logits, ids.to(acc.device), mask.to(acc.device))
                acc.backward(dist.global_mean_loss(loss_sum, rank_tokens, acc))
                if acc.sync_gradients and args.max_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # DeepSpeed: its own
                optimizer.step()
                optimizer.zero_grad()
            step_sum += loss_sum.detach().double().cpu()
        return float(dist.reduce_sum(step_sum, acc)) / float(dist.reduce_sum(float(rank_tokens), acc))

    losses = []
    for step in range(args.steps):
        losses.append(train_step())
        if args.fail != "none" and step == 0 and acc.process_index == 1:
            if args.fail == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)

    result = {
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "zero_stage": dist.zero_stage(acc),
        "grad_accum": gas,
        "losses": losses,
        "gathered_ranks": dist.gather_lists([acc.process_index]),
        "gathered_shards": dist.gather_lists(shard),
        "mean_rank": dist.reduce_mean(float(acc.process_index), acc),
        "seeds": dist.gather_lists([dist.per_rank_seed(7, acc)]),
    }
    tensors = {}
    probe_ids, probe_mask = probe_inputs(tokenizer)
    model.eval()
    with torch.no_grad():
        tensors["trained_logits"] = model(input_ids=probe_ids.to(acc.device),
                                          attention_mask=probe_mask.to(acc.device)).logits.float().cpu()

    # Greedy text of the trained model: full weights gathered, and sharded (this rank's prompts, synced).
    with dist.gathered_for_generation(model, acc, gather=True) as m:
        result["trained_text_gathered"] = generate(m, tokenizer, PROMPTS, do_sample=False, max_new_tokens=6,
                                                   batch_size=1).texts
    with dist.gathered_for_generation(model, acc, gather=False) as m:
        texts = []
        for prompt in dist.shard_batch(PROMPTS, acc):
            ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=acc.device)
            with torch.no_grad():
                gen = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=6, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **dist.generation_kwargs(model, acc, False))
            texts.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
        result["trained_text_sharded"] = dist.gather_lists(texts)
    # Sampled answers (2 per prompt, seeded per answer): full weights on every rank, and sharded weights
    # with uneven shares (rank 0: 1 prompt, rank 1: 3, one prompt per chunk), every rank stepping in sync.
    seeds = list(range(50, 50 + 2 * len(PROMPTS)))
    sampling = dict(n=2, temperature=0.9, max_new_tokens=6, batch_size=2)
    with dist.gathered_for_generation(model, acc, gather=True) as m:
        result["sampled_text_gathered"] = generate(m, tokenizer, PROMPTS, seeds=seeds, **sampling).texts
    with dist.gathered_for_generation(model, acc, gather=False) as m:
        shares = [(0, len(PROMPTS))] if acc.num_processes == 1 else [(0, 1), (1, len(PROMPTS))]
        first, last = shares[acc.process_index]
        synced = "synced_gpus" in dist.generation_kwargs(model, acc, False)
        texts = generate(m, tokenizer, PROMPTS[first:last], seeds=seeds[2 * first:2 * last], synced=synced,
                         **sampling).texts
        result["sampled_text_sharded"] = dist.gather_lists(texts)
        result["sampled_synced"] = synced
    # The engine must still train after generation (ZeRO-3 hooks restored): one more step.
    model.train()
    result["loss_after_generation"] = train_step()
    model.eval()
    with torch.no_grad():
        tensors["final_logits"] = model(input_ids=probe_ids.to(acc.device),
                                        attention_mask=probe_mask.to(acc.device)).logits.float().cpu()
    with dist.gathered_for_generation(model, acc) as m:
        result["final_text"] = generate(m, tokenizer, PROMPTS, do_sample=False, max_new_tokens=6).texts
    dist.save_full(model, acc, lambda m: save_model(m, tokenizer, out / "model"))
    state = dist.full_state_dict(model, acc)
    if acc.is_main_process:
        result["state_dict_keys"] = sorted(state)
        tensors["state_wte"] = state["transformer.wte.weight"].float().cpu().contiguous()

    # A frozen model (reference / reward role): sharded under ZeRO-3, plain elsewhere.
    frozen, _ = build(seed=1)
    frozen = dist.prepare_frozen(frozen, acc)
    params = list(frozen.parameters())
    # ZeRO-3 keeps this rank's partition in ``ds_tensor`` (``p`` itself is empty outside a gather).
    result["frozen_local_numel"] = sum(getattr(p, "ds_tensor", p).numel() for p in params)
    result["frozen_full_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    result["frozen_requires_grad"] = any(p.requires_grad for p in params)
    with torch.no_grad():
        tensors["frozen_logits"] = frozen(input_ids=probe_ids.to(acc.device),
                                          attention_mask=probe_mask.to(acc.device)).logits.float().cpu()
    with dist.gathered_for_generation(frozen, acc) as m:
        result["frozen_text"] = generate(m, tokenizer, PROMPTS, do_sample=False, max_new_tokens=6).texts

    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "tensors.safetensors"))
        (out / "result.json").write_text(json.dumps(result, indent=1))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    try:
        main()
    finally:
        dist.shutdown()
