"""Ranking throughput: workload "rank-k16" and a K sweep, SBERT and lexical, 1 and 2 workers.

Groups are K distinct short answers (5-15 words) drawn from DailyDialog responses. The marginal cost
per group excludes start-up: (time(N + M groups) - time(N groups)) / M, with the model already
loaded. Prints figures; asserts nothing about timings.

    python bench/bench_ranking.py --data PATH/TO/dailydialog/train.jsonl [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

# One thread per process, set before numpy loads: the layout the pool uses (one worker per core),
# and idle BLAS threads spinning on tiny matrices would otherwise dominate the maths timings.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_paths import DATA  # noqa: E402

from selfrank.ranking.config import EmbedderConfig, RankingConfig  # noqa: E402  (light imports only: see pool.py)


def short_answers(path: Path, limit: int = 20000) -> list[str]:
    answers, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["response"]
            if 5 <= len(text.split()) <= 15 and text not in seen:
                seen.add(text)
                answers.append(text)
                if len(answers) >= limit:
                    break
    return answers


def make_groups(answers: list[str], n: int, k: int, rng: random.Random, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "prompt": f"prompt {i}", "responses": rng.sample(answers, k)} for i in range(n)]


def time_in_process(ranker, groups: list[dict], chunk: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(groups), chunk):
        ranker.rank(groups[i:i + chunk])
    return time.perf_counter() - start


def maths_split(ranker, groups: list[dict]) -> tuple[float, float]:
    """Seconds per group of TextRank and of ISODATA alone, on the same embeddings."""
    from selfrank.ranking.isodata import isodata
    from selfrank.ranking.textrank import textrank_scores

    embeddings = ranker.embed_groups([g["responses"] for g in groups])
    start = time.perf_counter()
    for emb in embeddings:
        textrank_scores(emb, ranker.config.textrank)
    textrank = time.perf_counter() - start
    start = time.perf_counter()
    for emb in embeddings:
        isodata(emb, ranker.config.isodata)
    iso = time.perf_counter() - start
    return textrank / len(groups), iso / len(groups)


def marginal(ranker, answers, k: int, base: int, extra: int, chunk: int, rng) -> dict:
    small = make_groups(answers, base, k, rng, "a")
    large = make_groups(answers, base + extra, k, rng, "b")
    time_in_process(ranker, small[:chunk], chunk)  # warm caches and allocator
    t_small = time_in_process(ranker, small, chunk)
    mid = dict(ranker.stats)
    t_large = time_in_process(ranker, large, chunk)
    after = ranker.stats
    per_group = (t_large - t_small) / extra
    # Share of embedding vs maths within the large run, applied to the marginal cost.
    embed_share = (after["embed_s"] - mid["embed_s"]) / max(t_large, 1e-12)
    textrank, iso = maths_split(ranker, large[:min(len(large), 50)])
    return {"k": k, "ms_per_group": 1000 * per_group, "groups_per_s": 1 / per_group if per_group > 0 else float("inf"),
            "embed_ms": 1000 * per_group * embed_share, "textrank_ms": 1000 * textrank, "isodata_ms": 1000 * iso}


def pool_rate(config: RankingConfig, answers, k: int, n: int, workers: int, rng) -> float:
    from selfrank.ranking.pool import RankingPool

    with RankingPool(config, workers=workers, batch_groups=4) as pool:
        pool.wait_ready()
        for g in make_groups(answers, 4 * workers, k, rng, "w"):  # warm-up batch per worker
            pool.submit(g["id"], g["prompt"], g["responses"])
        pool.drain()
        groups = make_groups(answers, n, k, rng, "p")
        start = time.perf_counter()
        for g in groups:
            pool.submit(g["id"], g["prompt"], g["responses"])
        results = pool.drain()
        elapsed = time.perf_counter() - start
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:1]
    return n / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA / "dailydialog" / "train.jsonl"),
                        help="DailyDialog-style JSONL with a 'response' per line")
    parser.add_argument("--quick", action="store_true", help="small sizes: a rough figure in about a minute")
    parser.add_argument("--embedders", default="all-MiniLM-L6-v2,lexical")
    parser.add_argument("--ks", default="4,8,16,32,64")
    parser.add_argument("--skip-workers", action="store_true", help="skip the 1 vs 2 worker comparison")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from selfrank.ranking.ranker import Ranker

    answers = short_answers(Path(args.data))
    rng = random.Random(0)
    base, extra = (10, 50) if args.quick else (50, 200)
    chunk = 32
    print(f"answers: {len(answers)} distinct 5-15-word DailyDialog responses; torch threads 1 per worker")
    print(f"marginal cost = (time({base}+M groups) - time({base} groups)) / M, in-process, {chunk} groups per encode call")
    for name in args.embedders.split(","):
        config = RankingConfig(embedder=EmbedderConfig(name=name, threads=1))
        ranker = Ranker(config)
        start = time.perf_counter()
        ranker.embedder  # load
        print(f"\n== {name} (load {time.perf_counter() - start:.1f} s)")
        print(f"{'K':>3} {'M':>4} {'ms/group':>9} {'groups/s':>9} {'embed ms':>9} {'TextRank ms':>12} {'ISODATA ms':>11}")
        for k in (int(x) for x in args.ks.split(",")):
            # Same number of sentences per measurement for every K (M = 200 at K = 16).
            m = max(10, min(extra, extra * 16 // k))
            row = marginal(ranker, answers, k, base, m, chunk, rng)
            print(f"{k:>3} {m:>4} {row['ms_per_group']:>9.1f} {row['groups_per_s']:>9.1f} {row['embed_ms']:>9.1f} "
                  f"{row['textrank_ms']:>12.2f} {row['isodata_ms']:>11.2f}")
        if not args.skip_workers:
            n = 48 if args.quick else 160
            one = pool_rate(config, answers, 16, n, 1, rng)
            two = pool_rate(config, answers, 16, n, 2, rng)
            print(f"pool K=16, {n} groups: 1 worker {one:.1f} groups/s, 2 workers {two:.1f} groups/s, "
                  f"ratio {two / one:.2f} (cores: {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
