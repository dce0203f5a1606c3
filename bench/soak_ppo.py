"""Soak: a long PPO run on the ppo-tiny workload, with this process's resident memory sampled throughout.

Prints the RSS after the first tenth of the run (the warm-up: allocator pools and caches filled),
at the middle and at the end, and the growth from the first to the last tenth. Memory that stays flat
over many steps means nothing accumulates per step (logs, rollouts, graphs, ranking results).
Prints figures; asserts nothing.

    python bench/soak_ppo.py [--steps 300] [--threads 1] [--ranking]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ranking", action="store_true",
                        help="also feed every step's rollout groups to a ranking pool (the online-RM variant)")
    args = parser.parse_args()

    import torch

    import bench_ppo
    from selfrank.train.config import ExperimentConfig, PPOConfig
    from selfrank.train.stages.ppo import train_ppo

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="soak-ppo-"))
    bench_ppo.prepare(folder, bench_ppo.DEFAULT_TEXT, args.steps * bench_ppo.BATCH)
    prompts = __import__("json").loads((folder / "prompts.json").read_text())
    config = ExperimentConfig(seed=0)
    config.ppo = PPOConfig(steps=args.steps, batch_size=bench_ppo.BATCH, samples_per_prompt=2 if args.ranking else 1,
                           ppo_epochs=bench_ppo.EPOCHS, minibatches=bench_ppo.MINIBATCHES, lr=bench_ppo.LR,
                           critic_lr=bench_ppo.LR, kl_coef=bench_ppo.KL_COEF, max_new_tokens=16,
                           save_every=50, online_rm_every=5 if args.ranking else 0)

    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), rss_mb()))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.monotonic()
    sampler.start()
    pool = None
    try:
        if args.ranking:
            from selfrank.ranking.pool import RankingPool

            pool = RankingPool(config.ranking, workers=1)
        summary = train_ppo(config, prompts, folder / "policy", folder / "rm", folder / "out",
                            ranking_pool=pool, online_rm=args.ranking)
    finally:
        if pool is not None:
            pool.close()
        stop.set()
        sampler.join()
    end = time.monotonic()

    def at(fraction: float) -> float:
        moment = start + fraction * (end - start)
        return next((mb for t, mb in samples if t >= moment), samples[-1][1])

    first, middle, last = at(0.1), at(0.5), at(1.0)
    print(f"PPO soak: {summary['steps']} steps, {summary['episodes']} episodes in {end - start:.0f} s "
          f"({'with' if args.ranking else 'without'} the ranking pool), {len(samples)} RSS samples")
    print(f"  RSS after 10%: {first:.1f} MB, at 50%: {middle:.1f} MB, at the end: {last:.1f} MB, "
          f"peak {max(mb for _, mb in samples):.1f} MB; growth 10% -> end: {last - first:+.1f} MB")


if __name__ == "__main__":
    main()
