"""Sample stage wall time three ways: ranking off, ranking inline (synchronous), ranking through the
async CPU pool while generation continues. Prints figures and ratios; asserts nothing.

Workload: the embedded synthetic task's prompts, K answers per prompt, a randomly initialised policy
(timing only) of one of two sizes, and the SBERT (default) or lexical embedder:

* ``--policy demo``: the demo's tiny 2-layer model, which samples an answer in about 2 ms of one core,
  cheaper than embedding it with SBERT (about 6 ms per answer on one core): ranking cannot hide there.
* ``--policy gpt2-small``: GPT-2 small's shape (12 layers, 768 wide), the smallest policy users train;
  generation costs more than ranking, as it does on a GPU cluster with a CPU pool per node.

    python bench/bench_sample_overlap.py [--policy demo|gpt2-small] [--embedder NAME|lexical]
                                         [--prompts 256] [--k 8] [--workers 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# Overrides of the demo config per policy size.
POLICIES = {
    "demo": [],
    "gpt2-small": ["model.tiny.n_layer=12", "model.tiny.n_embd=768", "model.tiny.n_head=12"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="prompts per generate() call")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the three modes this many times")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="demo")
    parser.add_argument("--embedder", default=None, help="ranking.embedder.name (default: the config's)")
    args = parser.parse_args()

    import torch

    from selfrank.launch.config import load_experiment
    from selfrank.ranking.pool import RankingPool
    from selfrank.ranking.ranker import Ranker
    from selfrank.train.data.prompts import prompt_markers
    from selfrank.train.data.tasks import load_task
    from selfrank.train.sampling.generation import generate
    from selfrank.train.models.causal_lm import init_policy

    torch.set_num_threads(1)
    overrides = list(POLICIES[args.policy])
    if args.embedder:
        overrides.append(f"ranking.embedder.name={args.embedder}")
    config = load_experiment(REPO / "configs" / "demo.yaml", overrides)
    data = load_task(config.task)
    prompts = [ex.prompt for ex in data.train[: args.prompts]]
    texts = [f"{ex.prompt} {ex.target}" for ex in data.train]
    model, tokenizer = init_policy(config.model, texts, prompt_markers(config.task.prompt))
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]

    def sample(batch_index: int, batch: list[str]) -> list[dict]:
        out = generate(model, tokenizer, batch, n=args.k, temperature=0.8, top_p=0.95,
                       max_new_tokens=args.max_new_tokens, seed=batch_index, batch_size=len(batch) * args.k)
        return [{"id": f"{batch_index}-{i}", "prompt": p, "responses": out.texts[i * args.k:(i + 1) * args.k]}
                for i, p in enumerate(batch)]

    ranker = Ranker(config.ranking)
    ranker.rank([{"id": "warm", "prompt": "", "responses": ["a b", "c d"]}])  # model load outside timing
    pool = RankingPool(config.ranking, workers=args.workers)
    pool.wait_ready()

    def run(mode: str) -> float:
        started = time.perf_counter()
        for index, batch in enumerate(batches):
            groups = sample(index, batch)
            if mode == "sync":
                ranker.rank(groups)
            elif mode == "async":
                for g in groups:
                    pool.submit(f"{mode}-{g['id']}-{time.monotonic_ns()}", g["prompt"], g["responses"])
                pool.poll()
        if mode == "async":
            pool.drain()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"off": [], "sync": [], "async": []}
    try:
        for _ in range(args.rounds):
            for mode in times:
                times[mode].append(run(mode))
    finally:
        pool.close()
    best = {mode: min(values) for mode, values in times.items()}
    print(f"sample stage: {args.policy} policy, embedder {config.ranking.embedder.name}, "
          f"{len(prompts)} prompts x K={args.k}, {args.workers} ranking worker(s), best of "
          f"{args.rounds} alternating rounds")
    for mode, seconds in best.items():
        print(f"  ranking {mode:5s}: {seconds:7.2f} s  ({seconds / best['off']:.2f}x ranking off)")
    print(f"  async overhead vs off: {100 * (best['async'] / best['off'] - 1):+.1f}%  (goal: within 5%)")


if __name__ == "__main__":
    main()
