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
    info = cluster.wait_job(job, timeout=90)
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

    info = cluster.wait_job(job, timeout=90, states={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "run").glob("slurm-*")))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    assert info["Restarts"] == "1", info
    assert (state / "checkpoint").read_text() == "step 7"
    assert (state / "resumed").read_text() == "1"
    assert not (state / "not-preempted").exists()
    assert "signalled: checkpointing, then requeueing" in logs and "restart 1" in logs
