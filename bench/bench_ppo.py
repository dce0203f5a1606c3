"""Benchmark selfrank's PPO against TRL's ``trl.experimental.ppo.PPOTrainer`` on one workload.

Workload "ppo-tiny" (the default): GPT-2-shaped policy, reference, reward and value models (4 layers,
128 dim, 4 heads, byte-level BPE vocab 2000, random init, fp32, 2 torch threads); prompts of 32 tokens;
responses of 32 tokens (generation stops only at EOS, which a random model almost never emits); rollout
batch 16; 4 PPO epochs; 2 minibatches; 256 episodes; missing-EOS penalty on; no logging.

Workload "ppo-smol": the pre-trained SmolLM2-135M-Instruct (``--model``, a packaged short name resolved
as ``model.name`` is, or a folder), fp32, with a LoRA policy on both sides (r 8, alpha 16, dropout 0,
on every linear layer of the transformer: ours with ``ppo.policy: lora``, TRL with ``peft_config`` =
the same ``LoraConfig``; the reference is the policy with its adapters off on both sides). Prompts:
DailyDialog validation dialogues (``--data``), the last 3 turns (the last one the user's) through the
model's chat template, one per dialogue, kept when the rendered prompt has at most 128 tokens (whole
prompts, not cut mid-template); answers of at most 24 tokens at temperature 0.8, top-p 1; rollout batch
8 prompts; 4 PPO epochs; 2 minibatches; KL coefficient 0.5; missing-EOS penalty 1; 64 episodes.
Reward model, the same network for both: our ``RewardModel`` on SmolLM2's transformer with a fresh,
seeded scalar head (saved once); TRL reads the same weights as ``LlamaForSequenceClassification`` with
the head copied in (its score layer has no bias; ours is 0). Each side's critic starts from that
reward model, as each trainer does by design. The policy is saved once through our loader, which gives
the tokenizer a pad token distinct from ``<|im_end|>``: TRL takes every pad id in a sequence for
padding, so a pad equal to the end-of-turn token would mask the turn ends inside chat prompts.
Differences left as the trainers are: TRL always generates ``response_length`` tokens and truncates
after the stop token, ours stops once every answer has ended; TRL's stop token is ``<|im_end|>``.

Both trainers start from the same saved weights and run in separate child processes (so each peak RSS
is its own), alternately when ``--rounds`` > 1. Reported: episodes/s of the training loop (model
building and loading excluded for both; ours: ``train_ppo``'s loop time, TRL: ``trainer.train()``),
end-to-end seconds of the call, peak RSS of each child, and the share of the loop spent generating
(ours: the sampler call of each rollout; TRL: its ``batch_generation``), timed by wrapping that call.

    python bench/bench_ppo.py [--workload ppo-tiny|ppo-smol] [--episodes N] [--rounds 1] [--threads 2]
                              [--model smollm2-135m-instruct] [--data ../shared/data] [--text FILE.jsonl]
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_paths import DATA, data_path, model_folder  # noqa: E402

DEFAULT_TEXT = DATA / "dailydialog" / "validation.jsonl"
# ppo-tiny's settings (bench_dist.py and soak_ppo.py share them).
PROMPT_TOKENS = 32
RESPONSE_TOKENS = 32
BATCH = 16
EPOCHS = 4
MINIBATCHES = 2
TEMPERATURE = 0.8
LR = 3e-5
KL_COEF = 0.5
EOS_PENALTY = 1.0  # subtracted from the score of an answer without EOS (both trainers)


@dataclass(frozen=True)
class Workload:
    name: str
    episodes: int  # default count
    batch: int
    response_tokens: int
    lora: bool
    epochs: int = EPOCHS
    minibatches: int = MINIBATCHES
    temperature: float = TEMPERATURE
    lr: float = LR
    kl_coef: float = KL_COEF
    eos_penalty: float = EOS_PENALTY


WORKLOADS = {
    "ppo-tiny": Workload("ppo-tiny", episodes=256, batch=BATCH, response_tokens=RESPONSE_TOKENS, lora=False),
    "ppo-smol": Workload("ppo-smol", episodes=64, batch=8, response_tokens=24, lora=True),
}
SMOL_PROMPT_TOKENS = 128  # at most
LORA_R, LORA_ALPHA = 8, 16


def _texts(path: Path, limit: int = 4000) -> list[str]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            rows.append(" ".join(row.get("context", [])[-2:]) + " " + row.get("response", ""))
            if len(rows) >= limit:
                break
    return rows


def _write_meta(folder: Path, workload: str, **extra) -> None:
    (folder / "workload.json").write_text(json.dumps({"workload": workload, **extra}))


def prepare(folder: Path, text_path: Path, episodes: int, seed: int = 0) -> None:
    """ppo-tiny: build the tokenizer and the random-init models once; save what both trainers load."""
    import torch

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
    _write_meta(folder, "ppo-tiny")
    print(f"vocab {len(tokenizer)}, {len(prompts)} prompts of {PROMPT_TOKENS} tokens", file=sys.stderr)


def dialog_chat_prompts(tokenizer, path: Path, count: int, max_tokens: int) -> list[str]:
    """One prompt per dialogue: its last 3 context turns (the last one the user's) through the chat
    template, kept when the rendered prompt has at most ``max_tokens`` tokens."""
    from selfrank.train.models.causal_lm import prompt_token_ids

    prompts: list[str] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            turns = json.loads(line).get("context", [])
            if len(turns) < 3 or turns[0] in seen:
                continue
            seen.add(turns[0])
            turns = turns[-3:]
            roles = ["user" if (len(turns) - i) % 2 else "assistant" for i in range(len(turns))]
            prompt = tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in zip(roles, turns)],
                                                   tokenize=False, add_generation_prompt=True)
            if len(prompt_token_ids(tokenizer, prompt)) <= max_tokens:
                prompts.append(prompt)
                if len(prompts) >= count:
                    break
    return prompts


def prepare_smol(folder: Path, model: Path, data: Path, episodes: int, seed: int = 0) -> None:
    """ppo-smol: the policy through our loader (pad token added), a seeded reward model on its
    transformer, and the chat prompts; saved once for both trainers."""
    import torch

    from selfrank.train.config import ModelConfig
    from selfrank.train.models.causal_lm import load_model, prompt_token_ids, save_model
    from selfrank.train.models.reward_model import RewardModel

    torch.manual_seed(seed)
    policy, tokenizer = load_model(model, ModelConfig(name=str(model), dtype="float32"))
    save_model(policy, tokenizer, folder / "policy")
    del policy
    RewardModel.from_causal_lm(folder / "policy").save_pretrained(folder / "rm")
    text = data_path(data / "dailydialog" / "validation.jsonl")
    prompts = dialog_chat_prompts(tokenizer, text, max(episodes, WORKLOADS["ppo-smol"].episodes), SMOL_PROMPT_TOKENS)
    if len(prompts) < WORKLOADS["ppo-smol"].batch:
        raise SystemExit(f"only {len(prompts)} usable prompts of <= {SMOL_PROMPT_TOKENS} tokens in {text}")
    (folder / "prompts.json").write_text(json.dumps(prompts))
    _write_meta(folder, "ppo-smol", model=str(model))
    lengths = [len(prompt_token_ids(tokenizer, p)) for p in prompts]
    print(f"{model.name}: vocab {len(tokenizer)}, {len(prompts)} chat prompts of {min(lengths)}-{max(lengths)} "
          f"tokens (mean {sum(lengths) / len(lengths):.0f})", file=sys.stderr)


def _rate(episodes_per_s: float) -> str:
    return f"{episodes_per_s:.2f}" if episodes_per_s >= 1 else f"{episodes_per_s:.4f}"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _time_calls(module, name: str, box: dict) -> None:
    """Wrap ``module.name`` so that its wall time adds up in ``box["generate_s"]`` (the bench's timer)."""
    original = getattr(module, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            box["generate_s"] += time.perf_counter() - start

    setattr(module, name, timed)


def run_ours(folder: Path, episodes: int, w: Workload) -> dict:
    from selfrank.train.config import ExperimentConfig, ModelConfig, PPOConfig
    from selfrank.train.rl import rollout
    from selfrank.train.stages.ppo import train_ppo

    box = {"generate_s": 0.0}
    _time_calls(rollout, "generate", box)
    prompts = json.loads((folder / "prompts.json").read_text())
    steps = episodes // w.batch
    config = ExperimentConfig(seed=0)
    if w.lora:
        config.model = ModelConfig(name=str(folder / "policy"), dtype="float32")
    config.ppo = PPOConfig(steps=steps, batch_size=w.batch, samples_per_prompt=1, ppo_epochs=w.epochs,
                           minibatches=w.minibatches, lr=w.lr, critic_lr=w.lr, kl_coef=w.kl_coef,
                           temperature=w.temperature, top_p=1.0, max_new_tokens=w.response_tokens,
                           missing_eos_penalty=-w.eos_penalty, save_every=steps,
                           policy="lora" if w.lora else "full", lora_r=LORA_R, lora_alpha=LORA_ALPHA)
    out = folder / "ours_out"
    start = time.perf_counter()
    summary = train_ppo(config, prompts, folder / "policy", folder / "rm", out)
    total = time.perf_counter() - start
    lengths = [json.loads(line)["response/length"] for line in (out / "log.jsonl").read_text().splitlines()]
    return {"episodes": summary["episodes"], "train_s": summary["seconds"], "call_s": total,
            "generate_s": box["generate_s"], "mean_response_tokens": sum(lengths) / len(lengths)}


def run_trl(folder: Path, episodes: int, w: Workload) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer

    from selfrank.train.models.causal_lm import prompt_token_ids
    from selfrank.train.models.reward_model import RewardModel

    box = {"generate_s": 0.0}
    _time_calls(ppo_trainer, "batch_generation", box)
    tokenizer = AutoTokenizer.from_pretrained(folder / "policy")
    tokenizer.padding_side = "left"
    prompts = json.loads((folder / "prompts.json").read_text())
    dataset = Dataset.from_dict({"input_ids": [prompt_token_ids(tokenizer, p) for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(folder / "policy", dtype=torch.float32)
    head = RewardModel.from_pretrained(folder / "rm").head

    def scorer():
        model = AutoModelForSequenceClassification.from_pretrained(folder / "rm", num_labels=1, dtype=torch.float32)
        with torch.no_grad():
            model.score.weight.copy_(head.weight)  # the score head has no bias (ours starts at 0)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    peft = {}
    if w.lora:
        from peft import LoraConfig

        # What ours' ppo.policy: lora builds (train/models/peft_methods.with_lora).
        peft = {"peft_config": LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                          target_modules="all-linear", task_type="CAUSAL_LM")}
        ref = None  # the policy with its adapters off, as ours
    else:
        ref = AutoModelForCausalLM.from_pretrained(folder / "policy", dtype=torch.float32)
    work = folder / "trl_out"
    args = PPOConfig(
        output_dir=str(work), per_device_train_batch_size=w.batch, gradient_accumulation_steps=1,
        num_mini_batches=w.minibatches, num_ppo_epochs=w.epochs, total_episodes=episodes,
        response_length=w.response_tokens, stop_token="eos", missing_eos_penalty=w.eos_penalty,
        temperature=w.temperature, learning_rate=w.lr, kl_coef=w.kl_coef, local_rollout_forward_batch_size=w.batch,
        num_sample_generations=0, bf16=False, fp16=False, gradient_checkpointing=False, report_to=[],
        logging_strategy="no", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=scorer(),
                         train_dataset=dataset, value_model=scorer(), **peft)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    return {"episodes": trainer.state.episode, "train_s": train_s, "call_s": train_s, "generate_s": box["generate_s"]}


def child(which: str, folder: Path, episodes: int, threads: int, workload: str) -> None:
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)
    w = WORKLOADS[workload]
    result = run_ours(folder, episodes, w) if which == "ours" else run_trl(folder, episodes, w)
    result.update(which=which, episodes_per_s=result["episodes"] / result["train_s"], peak_rss_mb=_peak_rss_mb(),
                  generate_share=result["generate_s"] / result["train_s"])
    print("RESULT " + json.dumps(result), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="ppo-tiny")
    parser.add_argument("--episodes", type=int, help="default: the workload's (ppo-tiny 256, ppo-smol 64)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate ours/TRL this many times")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="ppo-smol: packaged model name or save_pretrained folder of SmolLM2-135M-Instruct")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with dailydialog/ (ppo-smol's prompts)")
    parser.add_argument("--text", type=Path, help="ppo-tiny: JSONL dialogue file for the tokenizer/prompts "
                                                  "(default: DATA/dailydialog/validation.jsonl)")
    parser.add_argument("--only", choices=("ours", "trl"), help="run one trainer only")
    parser.add_argument("--workdir", type=Path, help="keep the prepared models here (reused when present)")
    parser.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    w = WORKLOADS[args.workload]
    if args.episodes is None:
        args.episodes = w.episodes
    if args.episodes < w.batch or args.episodes % w.batch:
        parser.error(f"--episodes must be a positive multiple of {args.workload}'s rollout batch ({w.batch})")
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1")
    if args.workload == "ppo-smol" and args.text is not None:
        parser.error("--text is ppo-tiny's; ppo-smol reads its prompts from --data")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.folder, args.episodes, args.threads, args.workload)
        return
    w = WORKLOADS[args.workload]
    model = model_folder(args.model) if args.workload == "ppo-smol" else None
    data = data_path(args.data) if args.workload == "ppo-smol" else None
    text = data_path(args.text or DEFAULT_TEXT, "--text") if args.workload == "ppo-tiny" else None

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", OMP_NUM_THREADS=str(args.threads),
               TRL_EXPERIMENTAL_SILENCE="1")
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "workload.json"
        prepared = (folder / "prompts.json").is_file() and meta.is_file()
        if prepared and json.loads(meta.read_text())["workload"] != args.workload:
            raise SystemExit(f"--workdir {folder}: prepared for another workload; use another folder")
        if not prepared:
            if args.workload == "ppo-smol":
                prepare_smol(folder, model, data, args.episodes)
            else:
                prepare(folder, text, args.episodes)
        for round_index in range(args.rounds):
            order = ("ours", "trl") if round_index % 2 == 0 else ("trl", "ours")
            order = tuple(x for x in order if args.only in (None, x))
            for which in order:
                proc = subprocess.run([sys.executable, __file__, "--child", which, "--folder", str(folder),
                                       "--workload", args.workload, "--episodes", str(args.episodes),
                                       "--threads", str(args.threads)],
                                      env=env, capture_output=True, text=True)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                    raise SystemExit(f"{which} run failed (exit {proc.returncode})")
                result = json.loads(lines[-1][len("RESULT "):])
                results[which].append(result)
                print(f"round {round_index + 1} {which:>4}: {_rate(result['episodes_per_s']):>6} episodes/s "
                      f"({result['episodes']} episodes, train {result['train_s']:.2f} s, call {result['call_s']:.2f} s, "
                      f"generating {100 * result['generate_share']:.0f}%), peak RSS {result['peak_rss_mb']:.0f} MB",
                      flush=True)

    if args.only:
        return

    def best(which: str, key: str, pick=max) -> float:
        return pick(r[key] for r in results[which])

    ours_eps, trl_eps = best("ours", "episodes_per_s"), best("trl", "episodes_per_s")
    ours_rss, trl_rss = best("ours", "peak_rss_mb", min), best("trl", "peak_rss_mb", min)
    print(f"{args.workload} ({args.episodes} episodes, {args.threads} threads, best of {args.rounds}): "
          f"ours {_rate(ours_eps)} episodes/s, TRL {_rate(trl_eps)} episodes/s, ratio {ours_eps / trl_eps:.2f}x; "
          f"peak RSS ours {ours_rss:.0f} MB, TRL {trl_rss:.0f} MB")
    share = {which: [r["generate_share"] for r in results[which]] for which in results}
    print(f"share of the PPO loop spent generating: ours {100 * min(share['ours']):.0f}-{100 * max(share['ours']):.0f}%, "
          f"TRL {100 * min(share['trl']):.0f}-{100 * max(share['trl']):.0f}%")
    if results["ours"] and "mean_response_tokens" in results["ours"][0]:
        print(f"ours: mean response length {results['ours'][0]['mean_response_tokens']:.2f} tokens")


if __name__ == "__main__":
    main()
