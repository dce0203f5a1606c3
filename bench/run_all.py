"""Run every CPU benchmark in turn with its quick settings and print their figures (never asserts)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

RUNS = [
    ["bench_ranking.py", "--quick"],
    ["bench_sample_overlap.py"],
    ["bench_ppo.py", "--threads", "1"],
    ["bench_dist.py"],
]

if __name__ == "__main__":
    failed = 0
    for script, *args in RUNS:
        if not (BENCH / script).is_file():
            continue
        print(f"=== {script} {' '.join(args)}", flush=True)
        failed |= subprocess.run([sys.executable, str(BENCH / script), *args]).returncode != 0
    sys.exit(1 if failed else 0)
