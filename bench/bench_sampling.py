"""K answers per prompt: the prefix-shared sampler (``train/sampling/shared_prefix.py``, each prompt prefilled once) against
``model.generate`` over K copies of each prompt with its own sampling. Prints figures; asserts nothing.

Workload: SmolLM2-135M-Instruct in fp32 on CPU threads, the chat template applied to 8 SQuAD v2 dev
prompts (context + question, about 200 tokens) and 8 DailyDialog test prompts (the last 3 turns),
K = 4, 8, 16 answers per prompt, temperature 0.8, top-p 0.95 (top-k off), 24 new tokens, answers
ending at the chat turn's end. The two methods alternate in one run (the order flips every round, so
drift on a shared machine hits both); each figure is generated tokens (up to and including the stop
token) per second of the whole call (wall clock; and per CPU second of the process, which other
processes' load disturbs less), and the peak resident memory during the call. OpenMP threads wait
passively (``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it): on a shared machine, threads
that spin while their peer is descheduled turn other processes' load into large random slowdowns. ``--with-repeat`` adds
``generate(method="repeat")``: K copies through ``model.generate`` with the per-answer seeded sampler,
which separates the gain of the shared prefill from that of the sampler's cheaper top-p.

    python bench/bench_sampling.py [--model smollm2-135m-instruct|FOLDER] [--data DATA] [--ks 4,8,16] [--rounds 2]

(``--data`` defaults to ``shared/data`` next to the repository, wherever the command runs from; a
packaged model name resolves to its converted folder as ``model.name`` does.)

The last line reads ``sampling K=8 squad_v2: <ours> tok/s vs <hf> tok/s, ratio <r>x``: the best round
of each method (the least disturbed by other load); medians are printed above it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_paths import DATA, data_path, model_folder  # noqa: E402

SYSTEM = "Answer the question from the context in a few words."


def read_jsonl(path: Path, count: int, keep) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"{path}: not found (see --data)")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if keep(row):
                rows.append(row)
                if len(rows) == count:
                    break
    return rows


def squad_prompts(tokenizer, data: Path, count: int) -> list[str]:
    """The first ``count`` dev questions on distinct contexts whose chat prompt has 150-250 tokens."""
    seen: set[str] = set()

    def prompt(row: dict) -> str:
        user = f"Context: {row['context']}\nQuestion: {row['question']}"
        return tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
                                             tokenize=False, add_generation_prompt=True)

    def keep(row: dict) -> bool:
        if row["context"] in seen:
            return False
        seen.add(row["context"])
        return 150 <= len(tokenizer(prompt(row))["input_ids"]) <= 250

    return [prompt(row) for row in read_jsonl(data / "squad_v2" / "dev.jsonl", count, keep)]


def dialog_prompts(tokenizer, data: Path, count: int) -> list[str]:
    """The first ``count`` test dialogues with at least 3 turns: their last 3 turns, the last one the user's."""
    rows = read_jsonl(data / "dailydialog" / "test.jsonl", count, lambda row: len(row["context"]) >= 3)
    prompts = []
    for row in rows:
        turns = row["context"][-3:]
        roles = ["user" if (len(turns) - i) % 2 else "assistant" for i in range(len(turns))]
        prompts.append(tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in zip(roles, turns)],
                                                     tokenize=False, add_generation_prompt=True))
    return prompts


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(model, tokenizer, prompts, k, seeds, args, method="shared_prefix"):
    from selfrank.train.sampling.generation import generate

    out = generate(model, tokenizer, prompts, n=k, seeds=seeds, temperature=args.temperature, top_p=args.top_p,
                   max_new_tokens=args.new_tokens, batch_size=len(prompts) * k, method=method)
    return int(out.response_mask.sum())


def run_hf(model, tokenizer, prompts, k, seed, args):
    """K copies of each prompt through ``model.generate`` with its own sampling (one seeded stream)."""
    import torch

    from selfrank.train.sampling.generation import left_pad, response_mask_after_eos
    from selfrank.train.models.causal_lm import prompt_token_ids

    ids, mask = left_pad([prompt_token_ids(tokenizer, p) for p in prompts for _ in range(k)], tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                             top_p=args.top_p, top_k=0, max_new_tokens=args.new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    response_mask, _ = response_mask_after_eos(out[:, ids.shape[1]:], tokenizer.eos_token_id)
    return int(response_mask.sum())


def measure(fn) -> tuple[int, float, float, float]:
    """``(tokens, wall seconds, CPU seconds, peak RSS MiB)`` of one call."""
    import gc

    gc.collect()
    reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return tokens, time.perf_counter() - start, time.process_time() - cpu, peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="SmolLM2-135M-Instruct: packaged model name or save_pretrained folder")
    parser.add_argument("--data", default=str(DATA), help="folder with squad_v2/ and dailydialog/")
    parser.add_argument("--ks", default="4,8,16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="ours/HF alternations per setting")
    parser.add_argument("--datasets", default="squad_v2,dailydialog")
    parser.add_argument("--with-repeat", action="store_true", help="also time generate(method='repeat')")
    args = parser.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts its thread pool
    import torch

    from selfrank.ranking.engine import stable_seed
    from selfrank.train.config import ModelConfig
    from selfrank.train.models.causal_lm import load_causal_lm

    torch.set_num_threads(args.threads)
    folder = model_folder(args.model)
    data = data_path(args.data)
    model, tokenizer = load_causal_lm(str(folder), ModelConfig(name=str(folder), dtype="float32"))
    model.eval()
    builders = {"squad_v2": squad_prompts, "dailydialog": dialog_prompts}
    datasets = {name: builders[name](tokenizer, data, args.prompts) for name in args.datasets.split(",")}
    ks = [int(k) for k in args.ks.split(",")]
    print(f"model {folder.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, fp32, "
          f"{args.threads} threads (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), {args.new_tokens} new tokens, "
          f"T={args.temperature}, top_p={args.top_p}; "
          f"RSS after loading {peak_rss_mib():.0f} MiB")
    for name, prompts in datasets.items():
        lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
        print(f"{name}: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
              f"(mean {statistics.mean(lengths):.0f})")
    warm = datasets[next(iter(datasets))][:1]  # first calls pay one-off costs (allocator, kernels)
    run_ours(model, tokenizer, warm, 2, [1, 2], args)
    run_hf(model, tokenizer, warm, 2, 0, args)

    methods = ["ours", "hf"] + (["repeat"] if args.with_repeat else [])
    results: dict[tuple[str, int], dict[str, list]] = {}
    for name, prompts in datasets.items():
        for k in ks:
            seeds = [stable_seed("bench-sampling", i, j) for i in range(len(prompts)) for j in range(k)]
            calls = {
                "ours": lambda: run_ours(model, tokenizer, prompts, k, seeds, args),
                "hf": lambda: run_hf(model, tokenizer, prompts, k, round_, args),
                "repeat": lambda: run_ours(model, tokenizer, prompts, k, seeds, args, method="repeat"),
            }
            runs = {m: [] for m in methods}
            for round_ in range(args.rounds):
                for method in (methods if round_ % 2 == 0 else methods[::-1]):
                    figures = measure(calls[method])
                    runs[method].append(figures)
                    tokens, seconds, cpu, rss = figures
                    print(f"  {name} K={k:2d} {method:6s}: {tokens:5d} tokens in {seconds:6.2f} s = "
                          f"{tokens / seconds:6.1f} tok/s ({tokens / cpu:5.1f} per CPU s), peak RSS {rss:6.0f} MiB",
                          flush=True)
            results[(name, k)] = runs

    print("\ngenerated tokens per second: best round / median (wall clock), best per CPU second; peak RSS")
    print(f"{'dataset':12s} {'K':>3s} {'method':6s} {'best':>7s} {'median':>7s} {'per CPU s':>9s} {'RSS MiB':>8s}"
          f" {'best ratio':>10s} {'median ratio':>12s}")
    best: dict[tuple[str, int], dict[str, float]] = {}
    for (name, k), runs in results.items():
        rate = {m: [t / s for t, s, _, _ in runs[m]] for m in runs}
        best[(name, k)] = {m: max(rate[m]) for m in runs}
        for m in runs:
            ratio = "" if m == "hf" else (f"{max(rate[m]) / max(rate['hf']):9.2f}x "
                                          f"{statistics.median(rate[m]) / statistics.median(rate['hf']):11.2f}x")
            print(f"{name:12s} {k:3d} {m:6s} {max(rate[m]):7.1f} {statistics.median(rate[m]):7.1f} "
                  f"{max(t / c for t, _, c, _ in runs[m]):9.1f} {max(r for *_, r in runs[m]):8.0f} {ratio}")
    key = ("squad_v2", 8)
    if key in best:
        ours, hf = best[key]["ours"], best[key]["hf"]
        print(f"sampling K=8 squad_v2: {ours:.1f} tok/s vs {hf:.1f} tok/s, ratio {ours / hf:.2f}x")


if __name__ == "__main__":
    main()
