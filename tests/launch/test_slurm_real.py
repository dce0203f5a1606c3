"""Generated job scripts submitted to a real one-node Slurm cluster (slurmctld + slurmd + munged).

Needs the Debian packages slurm-wlm and munge, and root. The cluster lives in a temporary folder and
is stopped at the end of the module.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfrank.launch.local_slurm import LocalSlurm, missing_requirements
from selfrank.launch.slurm import render_sbatch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_requirements()
    assert not missing, f"a real Slurm cluster needs: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2) as running:
        yield running


def _job(tmp_path: Path, program: list[str], **kwargs) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = render_sbatch("unused.yaml", job_name="selfrank-test", cpu=True, gpus_per_node=1, run_dir=run_dir,
                           time="00:05:00", workdir=tmp_path, extra_env={"HF_HUB_OFFLINE": "1"},
                           _program=program, **kwargs)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    return path


def test_rank_job_runs_to_completion(cluster, tmp_path):
    groups = [{"id": f"g{i}", "prompt": f"question {i}",
               "responses": ["the cat sat on the mat", "a cat sat on a mat", "dogs bark loudly at night",
                             "the cat is on the mat"]} for i in range(3)]
    source = tmp_path / "groups.jsonl"
    source.write_text("".join(json.dumps(g) + "\n" for g in groups))
    target = tmp_path / "ranked.jsonl"
    script = _job(tmp_path, ["-m", "selfrank", "rank", "--input", str(source), "--output", str(target),
                             "--embedder", "lexical"])

    job = cluster.submit(script)
    info = cluster.wait_job(job, timeout=600)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "run").glob("slurm-*")))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs + cluster.logs()
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["g0", "g1", "g2"]
    assert all(len(r["scores"]) == 4 and sorted(r["order"]) == [0, 1, 2, 3] for r in rows)
    # The launch went through the script's rendezvous wiring on this node.
    assert f"main {cluster.hostname}:" in logs and "restart 0" in logs


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    trainer = tmp_path / "trainer.py"
    # First run: wait for SIGTERM, then "checkpoint" and exit. Second run: find the checkpoint, finish.
    trainer.write_text(
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        f"d = Path({str(state)!r})\n"
        "if (d / 'checkpoint').exists():\n"
        "    (d / 'resumed').write_text(os.environ.get('SLURM_RESTART_COUNT', '0'))\n"
        "    sys.exit(0)\n"
        "def on_term(*_):\n"
        "    time.sleep(1.0)  # a checkpoint takes a moment: the job must wait for it\n"
        "    (d / 'checkpoint').write_text('step 7')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "(d / 'started').write_text('1')\n"
        "time.sleep(120)\n"
        "(d / 'not-preempted').write_text('1')\n")
    job = cluster.submit(_job(tmp_path, [str(trainer)]))
    import time

    deadline = time.monotonic() + 60
    while not (state / "started").exists():
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.2)
    # What Slurm does 120 s before the time limit (--signal=B:USR1@120), sent now.
    done = cluster._run("scancel", "--signal=USR1", "--batch", job)
    assert done.returncode == 0, done.stderr

    info = cluster.wait_job(job, timeout=600, states={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "run").glob("slurm-*")))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    assert info["Restarts"] == "1", info
    assert (state / "checkpoint").read_text() == "step 7"
    assert (state / "resumed").read_text() == "1"
    assert not (state / "not-preempted").exists()
    assert "signalled: checkpointing, then requeueing" in logs and "restart 1" in logs


def test_cluster_options_are_accepted_and_applied_by_slurm(cluster, tmp_path):
    """--account, --qos, --exclusive, --mem, --constraint, extra #SBATCH lines, set-up lines and a wrapper
    command, as the real sbatch/slurmctld read and apply them."""
    from selfrank.launch.local_slurm import FEATURES

    out = tmp_path / "seen.json"
    probe = tmp_path / "probe.py"
    probe.write_text("import json, os, sys\n"
                     f"open({str(out)!r}, 'w').write(json.dumps({{k: os.environ.get(k) for k in "
                     "('SELFRANK_SETUP', 'SELFRANK_WRAPPED', 'SLURM_JOB_ID', 'SLURM_JOB_QOS', 'SLURM_JOB_ACCOUNT')}))\n")
    first, second = FEATURES.split(",")[:2]
    script = _job(tmp_path, [str(probe)], account="selfrank-acct", qos="normal", exclusive=True, mem="64M",
                  constraint=f"{first}&{second}", sbatch_lines=["--comment=selfrank-check"],
                  setup_lines=["export SELFRANK_SETUP=ran"], wrap="env SELFRANK_WRAPPED=yes")
    job = cluster.submit(script)
    info = cluster.wait_job(job, timeout=600)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "run").glob("slurm-*")))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs + cluster.logs()
    assert info["Account"] == "selfrank-acct"
    # A QOS is kept only by clusters with accounting (slurmdbd); this one has none, so sbatch accepting the
    # line is what can be seen here.
    assert info["QOS"] in ("normal", "(null)")
    assert info["OverSubscribe"] == "NO"  # --exclusive
    assert info["MinMemoryNode"] == "64M" and info["Features"] == f"{first}&{second}"
    assert info["Comment"] == "selfrank-check"
    seen = json.loads(out.read_text())
    assert seen["SELFRANK_SETUP"] == "ran" and seen["SELFRANK_WRAPPED"] == "yes" and seen["SLURM_JOB_ID"] == job
    assert seen["SLURM_JOB_ACCOUNT"] == "selfrank-acct"


def test_a_constraint_no_node_meets_is_refused_by_sbatch(cluster, tmp_path):
    script = _job(tmp_path, ["-c", "pass"], constraint="no-such-feature")
    with pytest.raises(RuntimeError, match="sbatch failed"):
        cluster.submit(script)


def test_a_selfrank_job_gets_its_overrides(cluster, tmp_path, monkeypatch):
    """`selfrank slurm --set ...` end to end: the rendered job runs the real trainer, which sees the
    overrides exactly (one with a space and a quote) and records them in its stage summary."""
    import yaml

    from selfrank.launch.cli import main

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "name": "slurmjob", "output_dir": str(tmp_path / "runs"), "torch_threads": 1,
        "task": {"synthetic": {"n_train": 32, "n_validation": 8, "n_test": 8}},
        "model": {"tiny": {"n_embd": 32, "n_head": 2, "n_positions": 128, "vocab_size": 400}},
        "sft": {"batch_size": 8, "block_size": 64}}))
    note = "no answer's here"
    assert main(["slurm", str(config), "--cpu", "--stage", "sft", "--time", "00:10:00",
                 "--set", "sft.max_steps=2", "--set", f"task.unanswerable_target={note}"]) == 0
    job = cluster.submit(tmp_path / "runs" / "slurmjob" / "job.sbatch")
    info = cluster.wait_job(job, timeout=600)
    run_dir = tmp_path / "runs" / "slurmjob"
    logs = "\n".join(p.read_text() for p in sorted(run_dir.glob("slurm-*")))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs[-4000:] + cluster.logs()
    settings = json.loads((run_dir / "sft" / "DONE.json").read_text())["settings"]
    assert settings["sft"]["max_steps"] == 2 and settings["task"]["unanswerable_target"] == note
