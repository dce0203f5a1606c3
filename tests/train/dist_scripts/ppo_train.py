"""Worker for tests/train/test_ppo_distributed.py and bench/bench_dist.py: one PPO run through ``train_ppo``.

Run with no launcher (one process) or under ``accelerate launch`` (DDP or DeepSpeed). ``--ppo`` is a
JSON object of ``PPOConfig`` fields. Rank 0 writes ``run.json`` into ``--out``: the stage summary,
the job's layout (processes, distributed type, ZeRO stage), the seconds ``train_ppo`` took and the
peak resident memory of every process (gathered).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from selfrank.atomic import write_json  # noqa: E402
from selfrank.train import dist as dist  # noqa: E402
from selfrank.train.config import ExperimentConfig, ModelConfig, PPOConfig  # noqa: E402
from selfrank.train.stages.ppo import train_ppo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft", required=True)
    parser.add_argument("--rm", required=True, help="reward model folder, or 'none' (str_direct: rank each group)")
    parser.add_argument("--prompts", required=True, help="JSON list of prompts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ppo", default="{}")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", help="model.mixed_precision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ExperimentConfig(seed=args.seed)
    config.ppo = PPOConfig(**json.loads(args.ppo))
    config.model = ModelConfig(mixed_precision=args.mixed_precision)
    prompts = json.loads(Path(args.prompts).read_text())

    acc = dist.get_accelerator(mixed_precision=config.model.mixed_precision)
    started = time.perf_counter()
    steps_run: list[int] = []  # the steps this launch ran (a resumed one starts after its checkpoint)
    rm = None if args.rm == "none" else Path(args.rm)
    summary = train_ppo(config, prompts, Path(args.sft), rm, Path(args.out), resume=args.resume,
                        log_step=lambda row, step: steps_run.append(step))
    seconds = time.perf_counter() - started
    # ru_maxrss is in KiB on Linux: this process's peak resident memory.
    rss = dist.gather_lists([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])
    if acc.is_main_process:
        write_json(Path(args.out) / "run.json", {
            "summary": summary, "world_size": acc.num_processes, "distributed_type": str(acc.distributed_type),
            "zero_stage": dist.zero_stage(acc), "seconds": seconds, "peak_rss_bytes": rss, "steps_run": steps_run,
            "mixed_precision": acc.mixed_precision, "deepspeed_config": dist.deepspeed_config(acc)})


if __name__ == "__main__":
    try:
        main()
    finally:
        dist.shutdown()
