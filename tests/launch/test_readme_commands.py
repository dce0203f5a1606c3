"""The README's commands, typed as a user would: read from README.md, run as real processes in a
directory outside the repository, with a clean environment (none of the Makefile's or the test
suite's variables: no NLTK_DATA, WANDB_MODE or HF_* offline switches). Sizes are shrunk with `--set`
so the whole "Use" block runs in about a minute; what cannot run here (a cluster, GPUs) is checked as
far as it goes: the job script is rendered and checked for its world size, and the GPU launch's config
is checked for the launcher's process count."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
README = (REPO / "README.md").read_text(encoding="utf-8")

# The demo at test size (appended after the README's own arguments, so these sizes win).
TINY = [f"--set={item}" for item in (
    "variants=[str]", "task.synthetic.n_train=64", "task.synthetic.n_validation=16", "task.synthetic.n_test=16",
    "model.tiny.n_embd=32", "model.tiny.n_head=2", "model.tiny.vocab_size=400", "sft.max_steps=6",
    "sft.batch_size=8", "sft.block_size=64", "sft.baselines=[]", "eval.samples_per_prompt=1",
    "sample.max_prompts=8", "sample.max_new_tokens=8", "sample.batch_size=4", "ranking.embedder.name=lexical",
    "reward.max_steps=4", "reward.batch_size=4", "reward.max_length=64", "ppo.steps=3", "ppo.batch_size=4",
    "ppo.minibatches=2", "ppo.ppo_epochs=1", "ppo.max_new_tokens=8", "eval.max_examples=8",
    "eval.max_new_tokens=8", "eval.bootstrap=20", "eval.agreement_groups=2")]


def _block(section: str, language: str, index: int = 0) -> str:
    """The ``index``-th fenced block of ``language`` under the heading ``section``."""
    body = README.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split(f"```{language}\n")[index + 1].split("```", 1)[0]


def _commands(section: str) -> list[list[str]]:
    text = _block(section, "bash").replace("\\\n", " ")
    return [shlex.split(line.split("  # ", 1)[0]) for line in text.splitlines() if line.strip()]


def _as_typed_elsewhere(argv: list[str]) -> list[str]:
    """What a user in another directory types: the same command with the repository's paths spelled out."""
    out = [str(BIN / Path(argv[0]).name) if argv[0].startswith(".venv/bin/") else argv[0]]
    out += [str(REPO / a) if a.startswith("configs/") else a for a in argv[1:]]
    return out


def _clean_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


def _selfrank(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=600)


def _done_stamps(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("DONE.json")}


@pytest.mark.slow
def test_the_use_commands_work_as_typed_from_another_directory(tmp_path):
    commands = _commands("## Use")
    assert [c[1] for c in commands] == ["run", "sft", "ppo", "run", "rank", "slurm"]
    here = tmp_path / "elsewhere"
    here.mkdir()
    run_all, sft_alone, ppo_resume, variant, rank, slurm = (_as_typed_elsewhere(c) for c in commands)

    # 1. the whole pipeline: the last line names the report, written under this directory
    done = _selfrank(run_all + TINY, here)
    assert done.returncode == 0, done.stderr[-3000:]
    report = Path("runs") / "demo" / "eval" / "report.md"
    assert done.stdout.strip().splitlines()[-1] == f"report: {report}"
    assert (here / report).is_file() and "## How to read this report" in (here / report).read_text()
    assert "WANDB offline mode" not in done.stdout + done.stderr  # tracking is disabled in the demo
    assert "plan: ppo: run (not run yet)" in done.stderr
    finished = _done_stamps(here / "runs" / "demo")

    # 2, 3. a stage alone, and --resume, on the finished run: skipped, nothing redone
    for argv, stage in ((sft_alone, "sft"), (ppo_resume, "ppo")):
        done = _selfrank(argv + TINY, here)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"{stage}: complete, skipped" in done.stderr
    assert _done_stamps(here / "runs" / "demo") == finished

    # 4. a variant under its own name: a run folder of its own, the original untouched
    done = _selfrank(variant + TINY, here)
    assert done.returncode == 0, done.stderr[-3000:]
    ranked = (here / "runs" / "demo-k16" / "sample" / "ranked.jsonl").read_text().splitlines()
    assert ranked and all(len(json.loads(line)["responses"]) == 16 for line in ranked)
    assert _done_stamps(here / "runs" / "demo") == finished

    # 5. ranking alone, on the README's worked example: every field as documented, the user's kept
    example_in, example_out = (json.loads(_block("### `selfrank rank`", "json", i)) for i in (0, 1))
    (here / "groups.jsonl").write_text(json.dumps(example_in) + "\n")
    done = _selfrank(rank, here)
    assert done.returncode == 0, done.stderr[-3000:]
    (out,) = [json.loads(line) for line in (here / "ranked.jsonl").read_text().splitlines()]
    assert list(out) == list(example_out)  # the user's fields in place, ours after them
    for key in ("id", "prompt", "responses", "gold", "meta", "order", "clusters", "representatives", "pairs"):
        assert out[key] == example_out[key], key
    assert out["scores"] == pytest.approx(example_out["scores"], abs=1e-4)
    assert out["noise"] == [None] * len(out["pairs"])  # the worked example adds --noise; this command does not

    # 6. the cluster job (no cluster here: rendered, not submitted), checked for 2 x 8 processes
    assert slurm[-1] == "--submit"
    done = _selfrank(slurm[:-1], here)
    assert done.returncode == 0, done.stderr[-3000:]
    script = here / "runs" / "gpt2_dailydialog" / "job.sbatch"
    assert done.stdout.strip() == f"wrote {Path('runs') / 'gpt2_dailydialog' / 'job.sbatch'}"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --nodes=2" in script.read_text() and "--set ppo.batch_size=32" in script.read_text()


def test_the_worked_rank_example_is_what_selfrank_rank_writes_with_noise(tmp_path):
    from selfrank.ranking.config import RankingConfig
    from selfrank.ranking.files import rank_file

    example_in, example_out = (json.loads(_block("### `selfrank rank`", "json", i)) for i in (0, 1))
    source = tmp_path / "groups.jsonl"
    source.write_text(json.dumps(example_in) + "\n")
    config = RankingConfig()
    config.noise.enabled = True  # --noise
    rank_file(source, tmp_path / "ranked.jsonl", config)
    (out,) = [json.loads(line) for line in (tmp_path / "ranked.jsonl").read_text().splitlines()]
    assert {k: v for k, v in out.items() if k != "scores"} == {k: v for k, v in example_out.items() if k != "scores"}
    assert out["scores"] == pytest.approx(example_out["scores"], abs=1e-4)
    described = README.split("### `selfrank rank`", 1)[1].split("A worked example", 1)[0]
    written = set(out) - set(example_in) | {"id", "responses"}  # what rank adds or may change
    assert written == {"id", "responses", "scores", "order", "clusters", "representatives", "pairs", "noise"}
    for field in written:  # each documented in the README's table
        assert f"| `{field}` |" in described, field


def test_the_cluster_commands_pass_their_checks_for_their_process_counts(tmp_path, monkeypatch, capsys):
    from selfrank.launch.cli import main
    from selfrank.launch.config import load_experiment
    from selfrank.launch.preflight import check_world

    gpu_launch, cpu_launch, slurm = _commands("## On a cluster")
    for argv in (gpu_launch, cpu_launch):
        launcher = argv[argv.index("launch") + 1:] if argv[0] == "accelerate" else argv[argv.index("accelerate") + 2:]
        accelerate = yaml.safe_load((REPO / launcher[launcher.index("--config_file") + 1]).read_text())
        config = load_experiment(REPO / argv[-1])
        check_world(config, accelerate["num_processes"] * accelerate.get("num_machines", 1))
    monkeypatch.chdir(tmp_path)
    assert slurm[-1] == "--submit"
    assert main([a for a in _as_typed_elsewhere(slurm)[1:-1]]) == 0
    script = (tmp_path / "runs" / "gpt2_squad_v2" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --partition=gpu" in script and "--use_deepspeed" in script
