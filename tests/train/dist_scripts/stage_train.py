"""Worker for tests/train/test_stage_distributed.py: the real SFT and reward-model stages on tiny data.

Run with no launcher (one process) or under ``accelerate launch`` (DDP or DeepSpeed). Every rank calls
``train.sft.train_sft`` then ``train.reward.train_reward`` with the same arguments; the per-step global
metrics come through the stages' ``log_step`` callbacks, and rank 0 writes them to ``--out/result.json``
next to the saved models (``sft/model``, ``rm/model``).

``--data`` holds what the test prepared once for every run: ``policy/`` (a tiny GPT-2 without dropout,
the RM backbone), ``pairs.jsonl`` and ``ranked.jsonl``.

Kill and resume: ``--stop-sft N --stop-reward M`` stops SFT after N steps (its last checkpoint is at an
earlier step) and the RM right after step M (checkpointed every 2 steps), as killed jobs would, and
writes ``stopped.json``; a second launch with ``--resume`` continues both from their checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from selfrank.train import dist as dist  # noqa: E402
from selfrank.train.config import RewardConfig, SFTConfig  # noqa: E402
from selfrank.train.models.causal_lm import load_model  # noqa: E402
from selfrank.train.stages.reward import train_reward  # noqa: E402
from selfrank.train.models.reward_model import disable_dropout  # noqa: E402
from selfrank.train.stages.sft import train_sft  # noqa: E402
from selfrank.train.data.synthetic import make_task  # noqa: E402

from tests.train.helpers import tiny_config  # noqa: E402

# Global batches: SFT 8 sequences of different lengths; RM 5 pairs, which two processes split 3 + 2 (an
# epoch of 24 training pairs ends in a batch of 4, split 2 + 2).
SFT = SFTConfig(lr=3e-3, batch_size=8, max_steps=4, block_size=64, save_every=2, warmup_ratio=0.25)
REWARD = RewardConfig(lr=3e-3, batch_size=5, epochs=2.0, max_steps=6, max_length=64, heldout_fraction=0.25, save_every=100)


class _Stopped(Exception):
    """Raised on every rank right after the RM's step ``--stop-reward`` (and its checkpoint)."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--stop-sft", type=int, default=None)
    parser.add_argument("--stop-reward", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    data_dir, out = Path(args.data), Path(args.out)
    # Checkpoints every 2 RM steps when a run is cut or resumed (the interval does not change the trajectory).
    reward = dataclasses.replace(REWARD, save_every=2) if args.stop_reward or args.resume else REWARD
    config = tiny_config(out, sft=dataclasses.replace(SFT, grad_accum=args.grad_accum), reward=reward)
    task = make_task(config.task.synthetic, config.task.prompt)

    metrics: dict[str, list] = {"sft": [], "reward": []}
    model, tokenizer = load_model(data_dir / "policy", config.model)
    disable_dropout(model)  # equal trajectories need equal forward passes on every example
    sft_summary = train_sft(config, task, model, tokenizer, "full", out / "sft", resume=args.resume,
                            stop_after=args.stop_sft, log_step=lambda m, step: metrics["sft"].append([step, m]))

    def stop_reward(step: int, loss: float) -> None:
        if args.stop_reward is not None and step >= args.stop_reward:
            raise _Stopped()

    try:
        rm_summary = train_reward(config, data_dir / "policy", data_dir / "pairs.jsonl", data_dir / "ranked.jsonl",
                                  out / "rm" / "model", resume=args.resume, on_step=stop_reward,
                                  log_step=lambda m, step: metrics["reward"].append([step, m]))
    except _Stopped:
        acc = dist.get_accelerator()
        if acc.is_main_process:
            (out / "stopped.json").write_text(json.dumps(metrics, indent=1))
        acc.wait_for_everyone()
        return
    acc = dist.get_accelerator()
    result = {"world_size": acc.num_processes, "distributed_type": str(acc.distributed_type),
              "zero_stage": dist.zero_stage(acc), "sft": metrics["sft"], "reward": metrics["reward"],
              "sft_summary": sft_summary, "rm_summary": rm_summary,
              # Every rank saw the same global metrics (reduced), not its own shard's.
              "sft_losses_per_rank": dist.gather_lists([[m["loss"] for _, m in metrics["sft"]]])}
    if acc.is_main_process:
        (out / "result.json").write_text(json.dumps(result, indent=1))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    try:
        main()
    finally:
        dist.shutdown()
