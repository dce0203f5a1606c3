"""Benchmark PPO ("ppo-tiny", fewer episodes) on 1 vs 2 processes: plain DDP, DeepSpeed ZeRO-2, ZeRO-3 (CPU).

Workload and models: those of ``bench/bench_ppo.py`` (GPT-2 shape, 4 layers, 128 dim, vocab 2000, random
init, fp32; 32-token prompts and responses; rollout batch 16; 4 PPO epochs; 2 minibatches), built once.
Variants, each in its own job so that peak RSS is per variant:

* ``single``: one process, no launcher, ``--threads`` torch threads;
* ``ddp``: ``accelerate launch`` 2 processes (gloo), ``--threads // 2`` threads each;
* ``zero2`` / ``zero3``: the same under DeepSpeed (reference and reward model as ZeRO-3 inference
  engines in ``zero3``).

Every variant uses the same number of threads in total, so on a machine with that many cores the
ratios say what the distributed layer costs (or gains) on CPU. Variants run alternately, in a rotated
order each round (``--rounds``), because a shared machine is noisy. Reported per variant: episodes/s of
the training loop (``train_ppo``'s own time: model loading and process start-up excluded), the job's
wall time, and the peak RSS of each process; then ratios to ``single``.

    python bench/bench_dist.py [--episodes 64] [--rounds 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_ppo import (  # noqa: E402
    BATCH, DEFAULT_TEXT, EOS_PENALTY, EPOCHS, KL_COEF, LR, MINIBATCHES, RESPONSE_TOKENS, TEMPERATURE, prepare)

WORKER = REPO / "tests" / "train" / "dist_scripts" / "ppo_train.py"
VARIANTS = ("single", "ddp", "zero2", "zero3")


def ds_config(stage: int) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "steps_per_print": 1_000_000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(variant: str, folder: Path, out: Path, episodes: int, threads: int) -> tuple[list[str], dict]:
    ppo = dict(steps=episodes // BATCH, batch_size=BATCH, samples_per_prompt=1, ppo_epochs=EPOCHS,
               minibatches=MINIBATCHES, lr=LR, critic_lr=LR, kl_coef=KL_COEF, temperature=TEMPERATURE, top_p=1.0,
               max_new_tokens=RESPONSE_TOKENS, missing_eos_penalty=-EOS_PENALTY, save_every=episodes // BATCH)
    per_process = threads if variant == "single" else max(1, threads // 2)
    args = [str(WORKER), "--sft", str(folder / "policy"), "--rm", str(folder / "rm"), "--prompts",
            str(folder / "prompts.json"), "--out", str(out), "--ppo", json.dumps(ppo), "--seed", "0",
            "--threads", str(per_process)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", OMP_NUM_THREADS=str(per_process))
    env.pop("ACCELERATE_USE_CPU", None)
    if variant == "single":
        return [sys.executable, *args], env
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if variant == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"  # gloo; --multi_gpu makes accelerate start a real process group
        return [*launch, "--multi_gpu", *args], env
    config = folder / f"{variant}.json"
    config.write_text(json.dumps(ds_config(2 if variant == "zero2" else 3)))
    return [*launch, "--use_deepspeed", "--deepspeed_config_file", str(config), *args], env


def run_variant(variant: str, folder: Path, episodes: int, threads: int) -> dict:
    out = folder / f"out_{variant}"
    cmd, env = command(variant, folder, out, episodes, threads)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not (out / "run.json").is_file():
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{variant} failed (exit {proc.returncode})")
    info = json.loads((out / "run.json").read_text())
    summary = info["summary"]
    return {"variant": variant, "processes": info["world_size"], "episodes": summary["episodes"],
            "episodes_per_s": summary["episodes_per_s"], "train_s": summary["seconds"], "job_s": wall,
            "peak_rss_mb": [b / 2**20 for b in info["peak_rss_bytes"]], "final_reward": summary["final_reward_mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in total per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    args = parser.parse_args()
    if args.episodes % BATCH:
        raise SystemExit(f"--episodes must be a multiple of the rollout batch ({BATCH})")

    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        folder = Path(tmp)
        prepare(folder, args.text, max(args.episodes, BATCH))
        for round_index in range(args.rounds):
            shift = round_index % len(args.variants)
            for variant in args.variants[shift:] + args.variants[:shift]:
                result = run_variant(variant, folder, args.episodes, args.threads)
                results[variant].append(result)
                rss = ", ".join(f"{mb:.0f}" for mb in result["peak_rss_mb"])
                print(f"round {round_index + 1} {variant:>6} ({result['processes']} proc): "
                      f"{result['episodes_per_s']:6.2f} episodes/s (loop {result['train_s']:.2f} s, job "
                      f"{result['job_s']:.1f} s), peak RSS per process [{rss}] MB", flush=True)

    def best(variant: str) -> dict:
        return max(results[variant], key=lambda r: r["episodes_per_s"])

    print(f"\nppo-tiny, {args.episodes} episodes, {args.threads} threads per variant, best of {args.rounds} "
          f"(variants alternated):")
    base = best("single") if "single" in results else None
    for variant in args.variants:
        b = best(variant)
        line = (f"  {variant:>6}: {b['episodes_per_s']:6.2f} episodes/s, peak RSS/process "
                f"{max(b['peak_rss_mb']):.0f} MB (sum {sum(b['peak_rss_mb']):.0f} MB)")
        if base is not None and variant != "single":
            line += (f"; vs single: speed {b['episodes_per_s'] / base['episodes_per_s']:.2f}x, "
                     f"RSS/process {max(b['peak_rss_mb']) / max(base['peak_rss_mb']):.2f}x")
        print(line)


if __name__ == "__main__":
    main()
