"""Stage driver of ``bench/gpu_check.sh``: the STR pipeline (sft, sample, reward, ppo) on a GPT-2-small
sized model built from its config (random init), one stage at a time, with each stage's throughput and
peak accelerator memory written to ``<out>/gpu_check.json``.

Run it under ``accelerate launch`` (DDP or DeepSpeed; every process runs the same code). ``--tiny``
shrinks the model and the workload to prove the wiring on CPU. Peak memory is
``torch.cuda.max_memory_allocated`` (reset before each stage; the largest over processes), 0 on CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from selfrank.atomic import write_json  # noqa: E402
from selfrank.train import dist as dist  # noqa: E402
from selfrank.train.config import ExperimentConfig, TinyModelConfig  # noqa: E402
from selfrank.train.pipeline import run_pipeline  # noqa: E402

STAGES = ("sft", "sample", "reward", "ppo")


def make_config(out: Path, tiny: bool, embedder: str) -> ExperimentConfig:
    """The synthetic task; GPT-2 small (12 layers, 768 dim, 12 heads; vocab: the task's BPE) or tiny."""
    config = ExperimentConfig(name="gpu-check", seed=0, output_dir=str(out), variants=["str"])
    config.task.synthetic.n_train = 512
    config.task.synthetic.n_validation = 32
    config.task.synthetic.n_test = 32
    config.model.tiny = (TinyModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=2000) if tiny
                         else TinyModelConfig(n_layer=12, n_embd=768, n_head=12, n_positions=256, vocab_size=2000))
    config.ranking.embedder.name = embedder
    scale = 1 if tiny else 4
    config.sft.batch_size = 8 * scale
    config.sft.max_steps = 4 if tiny else 40
    config.sft.block_size = 64
    config.sample.max_prompts = 8 * scale
    config.sample.samples_per_prompt = 4
    config.sample.batch_size = 8 * scale
    config.sample.max_new_tokens = 16 if tiny else 32
    config.reward.batch_size = 8 * scale
    config.reward.max_steps = 4 if tiny else 40
    config.reward.max_length = 96
    config.ppo.steps = 2 if tiny else 6
    config.ppo.batch_size = 4 * scale
    config.ppo.samples_per_prompt = 2
    config.ppo.minibatches = 2
    config.ppo.ppo_epochs = 2
    config.ppo.max_new_tokens = 16 if tiny else 32
    config.ppo.save_every = 1000
    return config


def throughput(stage: str, config: ExperimentConfig, summary: dict, seconds: float) -> dict:
    """Items per second of the stage's work (the stage's wall time, loading included)."""
    if stage == "sft":
        items = int(summary.get("steps", config.sft.max_steps)) * config.sft.batch_size
        return {"samples": items, "samples_per_s": items / seconds}
    if stage == "sample":
        items = int(summary.get("samples", 0))
        return {"samples": items, "samples_per_s": items / seconds}
    if stage == "reward":
        variant = summary.get("variants", {}).get("str", summary)
        items = int(variant.get("steps", config.reward.max_steps)) * config.reward.batch_size
        return {"pairs": items, "pairs_per_s": items / seconds}
    variant = summary.get("variants", {}).get("str", summary)
    log = Path(config.output_dir) / config.name / "ppo" / "str" / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    tokens = [r["tokens/s"] for r in rows if "tokens/s" in r]
    return {"episodes": variant.get("episodes"), "episodes_per_s": variant.get("episodes_per_s"),
            "tokens_per_s": sum(tokens) / len(tokens) if tokens else None}


def peak_memory(acc) -> int:
    if not torch.cuda.is_available():
        return 0
    peak = torch.tensor([float(torch.cuda.max_memory_allocated())], device=acc.device)
    return int(acc.gather(peak).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", default="run", help="name of this run in the JSON (e.g. zero2)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and workload (wiring check)")
    parser.add_argument("--embedder", default="lexical", help="ranking embedder (default: lexical, no model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    acc = dist.get_accelerator()
    config = make_config(args.out / args.label, args.tiny, args.embedder)
    results = {"label": args.label, "processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
               "zero_stage": dist.zero_stage(acc), "device": str(acc.device),
               "gpu": torch.cuda.get_device_name(acc.device) if torch.cuda.is_available() else None,
               "model": vars(config.model.tiny), "stages": {}}
    for stage in STAGES:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        summary = run_pipeline(config, [stage])[stage]  # main-only stages load whole weights themselves
        seconds = time.perf_counter() - started
        results["stages"][stage] = {"seconds": round(seconds, 2), "peak_gpu_memory_bytes": peak_memory(acc),
                                    **throughput(stage, config, summary, seconds)}
    if acc.is_main_process:
        write_json(args.out / f"gpu_check_{args.label}.json", results)
        for stage, row in results["stages"].items():
            rates = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_per_s") and v is not None)
            print(f"{args.label:>6} {stage:>6}: {row['seconds']:7.1f} s, peak GPU memory "
                  f"{row['peak_gpu_memory_bytes'] / 2**30:6.2f} GiB, {rates}", flush=True)
    acc.wait_for_everyone()


if __name__ == "__main__":
    try:
        main()
    finally:
        dist.shutdown()
