"""Benchmark "ppo-tiny": selfrank's PPO against TRL's ``trl.experimental.ppo.PPOTrainer`` on one workload.

Workload: GPT-2-shaped policy, reference, reward and value models (4 layers, 128 dim, 4 heads, byte-level
BPE vocab 2000, random init, fp32, 2 torch threads); prompts of 32 tokens; responses of 32 tokens
(generation stops only at EOS, which a random model almost never emits); rollout batch 16; 4 PPO epochs;
2 minibatches; 256 episodes; missing-EOS penalty on; no logging.

Both trainers start from the same saved weights and run in separate child processes (so each peak RSS
is its own), alternately when ``--rounds`` > 1. Reported: episodes/s of the training loop (model
building and loading excluded for both; ours: ``train_ppo``'s loop time, TRL: ``trainer.train()``),
end-to-end seconds of the call, and peak RSS of each child.

    python bench/bench_ppo.py [--episodes 256] [--rounds 1] [--threads 2] [--text FILE.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "dailydialog" / "validation.jsonl"
PROMPT_TOKENS = 32
RESPONSE_TOKENS = 32
BATCH = 16
EPOCHS = 4
MINIBATCHES = 2
TEMPERATURE = 0.8
LR = 3e-5
KL_COEF = 0.5
EOS_PENALTY = 1.0  # subtracted from the score of an answer without EOS (both trainers)


def _texts(path: Path, limit: int = 4000) -> list[str]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            rows.append(" ".join(row.get("context", [])[-2:]) + " " + row.get("response", ""))
            if len(rows) >= limit:
                break
    return rows


def prepare(folder: Path, text_path: Path, episodes: int, seed: int = 0) -> None:
    """Build the tokenizer and the random-init models once; save what both trainers load."""
    import torch

    sys.path.insert(0, str(REPO))
    from selfrank.train.config import TinyModelConfig
    from selfrank.train.models.causal_lm import build_tiny_model, save_model, train_bpe_tokenizer
    from selfrank.train.models.reward_model import RewardModel

    torch.manual_seed(seed)
    texts = _texts(text_path)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=2000)
    policy = build_tiny_model(TinyModelConfig(n_layer=4, n_embd=128, n_head=4, n_positions=128, vocab_size=2000),
                              tokenizer)
    save_model(policy, tokenizer, folder / "policy")
    rm = RewardModel.from_causal_lm(folder / "policy")
    rm.save_pretrained(folder / "rm")

    # Prompts of exactly PROMPT_TOKENS tokens that survive decode -> encode unchanged (ours takes strings).
    prompts: list[str] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < PROMPT_TOKENS:
            continue
        prompt = tokenizer.decode(ids[:PROMPT_TOKENS])
        if len(tokenizer(prompt)["input_ids"]) == PROMPT_TOKENS:
            prompts.append(prompt)
        if len(prompts) >= episodes:
            break
    if len(prompts) < BATCH:
        raise SystemExit(f"only {len(prompts)} usable {PROMPT_TOKENS}-token prompts in {text_path}")
    (folder / "prompts.json").write_text(json.dumps(prompts))
    print(f"vocab {len(tokenizer)}, {len(prompts)} prompts of {PROMPT_TOKENS} tokens", file=sys.stderr)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_ours(folder: Path, episodes: int) -> dict:
    sys.path.insert(0, str(REPO))
    from selfrank.train.config import ExperimentConfig, PPOConfig
    from selfrank.train.stages.ppo import train_ppo

    prompts = json.loads((folder / "prompts.json").read_text())
    steps = episodes // BATCH
    config = ExperimentConfig(seed=0)
    config.ppo = PPOConfig(steps=steps, batch_size=BATCH, samples_per_prompt=1, ppo_epochs=EPOCHS,
                           minibatches=MINIBATCHES, lr=LR, critic_lr=LR, kl_coef=KL_COEF, temperature=TEMPERATURE,
                           top_p=1.0, max_new_tokens=RESPONSE_TOKENS, missing_eos_penalty=-EOS_PENALTY,
                           save_every=steps)
    out = folder / "ours_out"
    start = time.perf_counter()
    summary = train_ppo(config, prompts, folder / "policy", folder / "rm", out)
    total = time.perf_counter() - start
    lengths = [json.loads(line)["response/length"] for line in (out / "log.jsonl").read_text().splitlines()]
    return {"episodes": summary["episodes"], "train_s": summary["seconds"], "call_s": total,
            "mean_response_tokens": sum(lengths) / len(lengths)}


def run_trl(folder: Path, episodes: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder / "policy")
    prompts = json.loads((folder / "prompts.json").read_text())
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(folder / "policy")
    ref = AutoModelForCausalLM.from_pretrained(folder / "policy")
    sys.path.insert(0, str(REPO))
    from selfrank.train.models.reward_model import RewardModel

    head = RewardModel.from_pretrained(folder / "rm").head

    def scorer():
        model = AutoModelForSequenceClassification.from_pretrained(folder / "rm", num_labels=1)
        with torch.no_grad():
            model.score.weight.copy_(head.weight)  # GPT-2's score head has no bias
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    work = folder / "trl_out"
    args = PPOConfig(
        output_dir=str(work), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        num_mini_batches=MINIBATCHES, num_ppo_epochs=EPOCHS, total_episodes=episodes, response_length=RESPONSE_TOKENS,
        stop_token="eos", missing_eos_penalty=EOS_PENALTY, temperature=TEMPERATURE, learning_rate=LR, kl_coef=KL_COEF,
        local_rollout_forward_batch_size=BATCH, num_sample_generations=0, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=scorer(),
                         train_dataset=dataset, value_model=scorer())
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    return {"episodes": trainer.state.episode, "train_s": train_s, "call_s": train_s}


def child(which: str, folder: Path, episodes: int, threads: int) -> None:
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)
    result = run_ours(folder, episodes) if which == "ours" else run_trl(folder, episodes)
    result.update(which=which, episodes_per_s=result["episodes"] / result["train_s"], peak_rss_mb=_peak_rss_mb())
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1, help="alternate ours/TRL this many times")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="JSONL dialogue file for the tokenizer/prompts")
    parser.add_argument("--only", choices=("ours", "trl"), help="run one trainer only")
    parser.add_argument("--workdir", type=Path, help="keep the prepared models here (reused when present)")
    parser.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.episodes, args.threads)
        return

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", OMP_NUM_THREADS=str(args.threads))
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        folder = args.workdir or Path(tmp)
        if not (folder / "prompts.json").is_file():
            prepare(folder, args.text, args.episodes)
        for round_index in range(args.rounds):
            order = ("ours", "trl") if round_index % 2 == 0 else ("trl", "ours")
            order = tuple(w for w in order if args.only in (None, w))
            for which in order:
                proc = subprocess.run([sys.executable, __file__, "--child", which, "--folder", str(folder),
                                       "--episodes", str(args.episodes), "--threads", str(args.threads)],
                                      env=env, capture_output=True, text=True)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                    raise SystemExit(f"{which} run failed (exit {proc.returncode})")
                result = json.loads(lines[-1][len("RESULT "):])
                results[which].append(result)
                print(f"round {round_index + 1} {which:>4}: {result['episodes_per_s']:6.2f} episodes/s "
                      f"({result['episodes']} episodes, train {result['train_s']:.2f} s, call {result['call_s']:.2f} s), "
                      f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)

    if args.only:
        return

    def best(which: str, key: str, pick=max) -> float:
        return pick(r[key] for r in results[which])

    ours_eps, trl_eps = best("ours", "episodes_per_s"), best("trl", "episodes_per_s")
    ours_rss, trl_rss = best("ours", "peak_rss_mb", min), best("trl", "peak_rss_mb", min)
    print(f"ppo-tiny ({args.episodes} episodes, {args.threads} threads, best of {args.rounds}): "
          f"ours {ours_eps:.2f} episodes/s, TRL {trl_eps:.2f} episodes/s, ratio {ours_eps / trl_eps:.2f}x; "
          f"peak RSS ours {ours_rss:.0f} MB, TRL {trl_rss:.0f} MB")
    if results["ours"] and "mean_response_tokens" in results["ours"][0]:
        print(f"ours: mean response length {results['ours'][0]['mean_response_tokens']:.2f} tokens")


if __name__ == "__main__":
    main()
