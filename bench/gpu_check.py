"""Stage driver of ``bench/gpu_check.sh``: the STR pipeline (sft, sample, reward, ppo) on a GPT-2-small
sized model built from its config (random init), one stage at a time, with each stage's throughput and
peak accelerator memory written to ``<out>/gpu_check_<label>.json``.

Run it under ``accelerate launch`` (DDP or DeepSpeed; every process runs the same code). The precision is
``model.mixed_precision`` (``--mixed-precision``, default bf16: float32 master weights, bf16 compute;
under DeepSpeed its bf16 mode, switched on from that one setting). ``--resume-check`` then runs PPO
three more times from the pipeline's SFT and reward models: uninterrupted for 4 steps, cut after step 2
(its checkpoint), and resumed to step 4. It requires the resumed engine's optimizer state (moments,
float32 master weights: every tensor of every process's partition) to equal, bit for bit, the state the
cut run saved, and reports how far the resumed steps 3-4 are from the uninterrupted ones (on a GPU,
kernels with atomic adds make two runs differ slightly; on CPU they agree to round-off).

``--tiny`` shrinks the model and the workload to prove the wiring on CPU. Peak memory is
``torch.cuda.max_memory_allocated`` (reset before each stage; the largest over processes), 0 on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
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
RESUME_KEYS = ("loss/policy", "loss/value", "reward/mean", "objective/kl")


def make_config(out: Path, tiny: bool, embedder: str, mixed_precision: str) -> ExperimentConfig:
    """The synthetic task; GPT-2 small (12 layers, 768 dim, 12 heads; vocab: the task's BPE) or tiny."""
    config = ExperimentConfig(name="gpu-check", seed=0, output_dir=str(out), variants=["str"])
    config.task.synthetic.n_train = 512
    config.task.synthetic.n_validation = 32
    config.task.synthetic.n_test = 32
    config.model.tiny = (TinyModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=2000) if tiny
                         else TinyModelConfig(n_layer=12, n_embd=768, n_head=12, n_positions=256, vocab_size=2000))
    config.model = dataclasses.replace(config.model, mixed_precision=mixed_precision)
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
    return {"episodes": variant.get("episodes"), "episodes_per_s": variant.get("episodes_per_s"),
            "tokens_per_s": ppo_tokens_per_s(Path(config.output_dir) / config.name / "ppo" / "str")}


def ppo_tokens_per_s(folder: Path) -> float | None:
    """Mean of the PPO log's per-step ``tokens/s`` (response tokens over the step's wall time)."""
    log = folder / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    tokens = [r["tokens/s"] for r in rows if "tokens/s" in r]
    return sum(tokens) / len(tokens) if tokens else None


def peak_memory(acc) -> int:
    if not torch.cuda.is_available():
        return 0
    peak = torch.tensor([float(torch.cuda.max_memory_allocated())], device=acc.device)
    return int(acc.gather(peak).max())


def optimizer_fingerprint(model, acc) -> list:
    """Every tensor of this job's optimizer state as (process, path, dtype, sum, abs-sum), gathered: the
    DeepSpeed engine's partitions (moments, float32 master weights), or a torch optimizer's state."""
    engine_optimizer = getattr(model, "optimizer", None)
    state = engine_optimizer.state_dict() if engine_optimizer is not None else {}
    rows = []

    def walk(value, path: str) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().double().cpu()
            rows.append((acc.process_index, path, str(value.dtype), float(t.sum()), float(t.abs().sum())))
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(value[key], f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}/{i}")

    walk(state, "")
    return dist.gather_lists(rows)


def resume_check(config: ExperimentConfig, out: Path, acc) -> dict:
    """PPO uninterrupted for 4 steps, and cut after 2 then resumed: the optimizer state must come back
    exactly; how far the resumed steps are from the uninterrupted ones is reported. Collective."""
    import selfrank.train.stages.ppo as ppo_stage
    from selfrank.train.data.tasks import load_task
    from selfrank.train.rl.ppo_run import PPORun

    run_root = Path(config.output_dir) / config.name
    sft, rm = run_root / "sft" / "model", run_root / "reward" / "str" / "model"
    prompts = [ex.prompt for ex in load_task(config.task).train]
    four = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, steps=4, save_every=1000))
    two = dataclasses.replace(four, ppo=dataclasses.replace(four.ppo, steps=2))
    folder = out / "resume_check"
    observed: dict[str, list] = {}
    save, start = PPORun.save_checkpoint, ppo_stage.start_run

    def save_and_observe(run: PPORun) -> None:
        save(run)
        observed["saved"] = optimizer_fingerprint(run.model, run.acc)

    def start_and_observe(*args, **kwargs) -> PPORun:
        run = start(*args, **kwargs)
        observed["loaded"] = optimizer_fingerprint(run.model, run.acc)
        return run

    started = time.perf_counter()
    ppo_stage.train_ppo(four, prompts, sft, rm, folder / "uninterrupted")
    PPORun.save_checkpoint = save_and_observe
    try:
        ppo_stage.train_ppo(two, prompts, sft, rm, folder / "cut")  # its last checkpoint: after step 2
        saved = observed["saved"]
        ppo_stage.start_run = start_and_observe
        ppo_stage.train_ppo(four, prompts, sft, rm, folder / "cut", resume=True)
    finally:
        PPORun.save_checkpoint, ppo_stage.start_run = save, start
    loaded = observed["loaded"]
    seconds = time.perf_counter() - started

    def rows(name: str) -> dict[int, dict]:
        lines = (folder / name / "log.jsonl").read_text().splitlines()
        return {row["step"]: row for row in map(json.loads, lines) if "step" in row}

    full, resumed = rows("uninterrupted"), rows("cut")
    worst = max(abs(resumed[s][k] - full[s][k]) / max(abs(full[s][k]), 1e-6) for s in (3, 4) for k in RESUME_KEYS)
    engine_files = sorted(p.name for p in (folder / "cut" / "checkpoint" / "deepspeed").rglob("*.pt"))
    return {"optimizer_state_restored": saved == loaded and len(saved) > 0, "state_tensors": len(saved),
            "engine_files": engine_files, "steps": sorted(resumed), "seconds": round(seconds, 2),
            "max_rel_diff_steps_3_4": worst, "tokens_per_s": ppo_tokens_per_s(folder / "cut")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--label", default="run", help="name of this run in the JSON (e.g. zero2)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and workload (wiring check)")
    parser.add_argument("--embedder", default="lexical", help="ranking embedder (default: lexical, no model)")
    parser.add_argument("--mixed-precision", default="bf16", choices=("no", "bf16", "fp16"))
    parser.add_argument("--resume-check", action="store_true", help="also check a cut-and-resumed PPO run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    acc = dist.get_accelerator(mixed_precision=args.mixed_precision)
    config = make_config(args.out / args.label, args.tiny, args.embedder, args.mixed_precision)
    ds_config = dist.deepspeed_config(acc) or {}
    results = {"label": args.label, "processes": acc.num_processes, "distributed_type": str(acc.distributed_type),
               "zero_stage": dist.zero_stage(acc), "device": str(acc.device),
               "mixed_precision": acc.mixed_precision, "deepspeed_bf16": ds_config.get("bf16"),
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
    if args.resume_check:
        results["resume"] = resume_check(config, args.out / args.label, acc)
    if acc.is_main_process:
        write_json(args.out / f"gpu_check_{args.label}.json", results)
        print(f"{args.label:>6} precision {results['mixed_precision']} (DeepSpeed bf16: {results['deepspeed_bf16']})",
              flush=True)
        for stage, row in results["stages"].items():
            rates = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_per_s") and v is not None)
            print(f"{args.label:>6} {stage:>6}: {row['seconds']:7.1f} s, peak GPU memory "
                  f"{row['peak_gpu_memory_bytes'] / 2**30:6.2f} GiB, {rates}", flush=True)
        if "resume" in results:
            r = results["resume"]
            print(f"{args.label:>6} resume: optimizer state restored exactly: {r['optimizer_state_restored']} "
                  f"({r['state_tensors']} tensors, {len(r['engine_files'])} DeepSpeed files), steps 3-4 vs "
                  f"uninterrupted: max rel. diff {r['max_rel_diff_steps_3_4']:.2e}, tokens/s "
                  f"{r['tokens_per_s'] or 0:.1f}, {r['seconds']:.1f} s", flush=True)
    acc.wait_for_everyone()
    if args.resume_check and not results["resume"]["optimizer_state_restored"]:
        raise SystemExit(f"gpu_check {args.label}: the resumed optimizer state differs from the saved one")


if __name__ == "__main__":
    try:
        main()
    finally:
        dist.shutdown()
