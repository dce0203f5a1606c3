"""The sbatch script: structure, multi-node wiring, validation and shell-injection safety."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfrank.launch.cli import main as cli_main
from selfrank.launch.slurm import render_sbatch
from selfrank.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def _render(tmp_path: Path, **overrides) -> str:
    kwargs = dict(job_name="demo", nodes=2, gpus_per_node=4, partition="gpu", time="1-00:00:00",
                  deepspeed_config="configs/deepspeed/zero2.json", stage="run", cpu=False,
                  run_dir=tmp_path / "runs" / "demo", extra_env={"NCCL_DEBUG": "WARN"}, workdir=tmp_path)
    kwargs.update(overrides)
    config = kwargs.pop("config_path", "configs/demo.yaml")
    return render_sbatch(config, **kwargs)


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sbatch"
    path.write_text(script)
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            options[key] = value
    return options


def _per_node_argv(script: str) -> list[str]:
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    tokens = shlex.split(srun)
    assert tokens[-1] == "&" and tokens[-3:-1][0] == "-c"
    return shlex.split(tokens[-2])


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_multinode_gpu_script_structure(tmp_path):
    script = _render(tmp_path)
    _bash_syntax_ok(script, tmp_path)
    opts = _sbatch_options(script)
    assert opts["--job-name"] == "demo" and opts["--nodes"] == "2" and opts["--ntasks-per-node"] == "1"
    assert opts["--gpus-per-node"] == "4" and opts["--cpus-per-task"] == "32"
    assert opts["--partition"] == "gpu" and opts["--time"] == "1-00:00:00"
    assert opts["--output"] == str(tmp_path / "runs" / "demo" / "slurm-%j.out")
    assert opts["--error"] == str(tmp_path / "runs" / "demo" / "slurm-%j.err")
    assert "--requeue" in opts and opts["--signal"] == "B:USR1@120"

    lines = script.splitlines()
    assert 'export MAIN_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    assert 'export NUM_PROCESSES="$((SLURM_NNODES * PROCS_PER_NODE))"' in lines and "PROCS_PER_NODE=4" in lines
    assert f"CONFIG={tmp_path / 'configs' / 'demo.yaml'}" in lines
    assert f"export DEEPSPEED_CONFIG={tmp_path / 'configs' / 'deepspeed' / 'zero2.json'}" in lines
    assert "trap on_preempt USR1 TERM" in lines and '    scontrol requeue "$SLURM_JOB_ID"' in lines

    argv = _per_node_argv(script)
    assert argv[:5] == ["exec", "$PYTHON", "-m", "selfrank.launch.slurm", "supervise"]
    assert argv[5:8] == ["$PYTHON", "-m", "accelerate.commands.launch"]
    assert _after(argv, "--num_machines") == "$SLURM_NNODES"
    assert _after(argv, "--machine_rank") == "$SLURM_NODEID"
    assert _after(argv, "--num_processes") == "$NUM_PROCESSES"
    assert _after(argv, "--main_process_ip") == "$MAIN_HOST"
    assert _after(argv, "--main_process_port") == "$MAIN_PORT"
    assert "--use_deepspeed" in argv and _after(argv, "--deepspeed_config_file") == "$DEEPSPEED_CONFIG"
    assert _after(argv, "--deepspeed_multinode_launcher") == "standard"
    assert "--multi_gpu" not in argv  # DeepSpeed brings its own distributed set-up
    assert argv[-5:] == ["-m", "selfrank", "$STAGE", "$CONFIG", "--resume"]
    # The per-node command is single-quoted in the batch shell, so $SLURM_NODEID is each node's own.
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert "'exec \"$PYTHON\"" in srun and '--machine_rank "$SLURM_NODEID"' in srun


def test_cpu_recipe(tmp_path):
    one = _render(tmp_path, cpu=True, nodes=1, gpus_per_node=1, deepspeed_config=None, partition=None, time=None)
    _bash_syntax_ok(one, tmp_path)
    opts = _sbatch_options(one)
    assert "--gpus-per-node" not in opts and "--partition" not in opts and "--time" not in opts
    assert "export ACCELERATE_USE_CPU=1" in one.splitlines()
    argv = _per_node_argv(one)
    assert "--multi_gpu" not in argv and "--use_deepspeed" not in argv
    assert _after(argv, "--mixed_precision") == "no" and _after(argv, "--dynamo_backend") == "no"
    two = _per_node_argv(_render(tmp_path, cpu=True, nodes=1, gpus_per_node=2, deepspeed_config=None))
    assert "--multi_gpu" in two and _after(two, "--mixed_precision") == "no"


@pytest.mark.parametrize("overrides, field", [
    ({"nodes": 0}, "--nodes"),
    ({"gpus_per_node": 0}, "--gpus-per-node"),
    ({"time": "one day"}, "--time"),
    ({"time": "25:00:00:00"}, "--time"),
    ({"job_name": "a\nb"}, "job name"),
    ({"job_name": "a b"}, "job name"),
    ({"partition": "gpu debug"}, "--partition"),
    ({"stage": "train"}, "--stage"),
    ({"extra_env": {"BAD NAME": "1"}}, "environment variable"),
    ({"extra_env": {"X": "a\nb"}}, "environment variable X"),
    ({"run_dir": "/tmp/run dir"}, "run folder"),
    ({"config_path": "configs/a\nb.yaml"}, "config path"),
])
def test_invalid_values_are_rejected(tmp_path, overrides, field):
    with pytest.raises(UserError, match=field.replace("-", r"\-")):
        _render(tmp_path, **overrides)


def test_valid_time_formats(tmp_path):
    for value in ("30", "30:00", "12:00:00", "2-0", "2-12:30", "2-12:30:00", "UNLIMITED"):
        assert f"#SBATCH --time={value}" in _render(tmp_path, time=value)


EVIL = ["$(touch pwned)", "`touch pwned`", "; touch pwned", "x'; touch pwned; '", 'x"; touch pwned; "',
        "a && touch pwned", "$(rm -rf /)", "; rm -rf /", "a\\\"b'c"]


def _executed_assignments(script: str, tmp_path: Path) -> dict[str, str]:
    """Run the script's assignment lines for real (everything before the Slurm-only MAIN_HOST line)."""
    lines = script.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("cd "))
    stop = next(i for i, l in enumerate(lines) if l.startswith("export MAIN_HOST="))
    probe = "\n".join(lines[start:stop] + [
        'python3 -c \'import json, os, sys; print(json.dumps(dict(os.environ) | '
        '{"CONFIG": sys.argv[1], "STAGE": sys.argv[2]}))\' "$CONFIG" "$STAGE"'])
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("evil", EVIL)
def test_injection_is_quoted_or_rejected(tmp_path, evil):
    work = tmp_path / "work"
    work.mkdir()
    cases = {"config_path": evil, "job_name": evil, "partition": evil, "time": evil,
             "extra_env": {"SELFRANK_NOTE": evil}, "deepspeed_config": evil, "run_dir": work / evil}
    for field, value in cases.items():
        try:
            script = _render(work, cpu=True, **{field: value})
        except UserError:
            assert field in ("job_name", "partition", "time", "run_dir"), f"{field} should be quoted, not rejected"
            continue
        _bash_syntax_ok(script, tmp_path)
        env = _executed_assignments(script, work)
        if field == "config_path":
            assert env["CONFIG"] == str(work / evil)
        elif field == "extra_env":
            assert env["SELFRANK_NOTE"] == evil
        elif field == "deepspeed_config":
            assert env["DEEPSPEED_CONFIG"] == str(work / evil)
        else:
            raise AssertionError(f"{field}={value!r} was accepted")
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()


def _config_file(tmp_path: Path, name: str = "clu") -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(f"name: {name}\noutput_dir: {tmp_path / 'out'}\ntracking: {{wandb: disabled}}\n")
    return path


def test_cli_writes_the_script_into_the_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config_file(tmp_path)
    assert cli_main(["slurm", str(config), "--nodes", "2", "--gpus-per-node", "2", "--time", "02:00:00",
                     "--deepspeed", str(REPO / "configs" / "deepspeed" / "zero3.json"), "--stage", "ppo"]) == 0
    script = (tmp_path / "out" / "clu" / "job.sbatch").read_text()
    assert "#SBATCH --job-name=clu" in script and "#SBATCH --nodes=2" in script
    assert "STAGE=ppo" in script.splitlines() and f"CONFIG={config}" in script.splitlines()
    assert not list((tmp_path / "out" / "clu").glob(".*.tmp")), "written atomically, no temp left"
    assert "job.sbatch" in capsys.readouterr().out


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config_file(tmp_path)
    assert cli_main(["slurm", str(config), "--time", "soon"]) == 2
    assert cli_main(["slurm", str(config), "--deepspeed", str(tmp_path / "missing.json")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: 'a b'\n")
    assert cli_main(["slurm", str(bad)]) == 2
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert cli_main(["slurm", str(config), "--submit", "--output", str(tmp_path / "j.sbatch")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("selfrank: error: ") for line in err)
    assert "--time" in err[0] and "missing.json" in err[1] and "name" in err[2] and "sbatch" in err[3]


def test_supervise_waits_for_orphaned_trainers(tmp_path):
    # The launcher exits at once; the "trainer" it leaves behind finishes its checkpoint later.
    marker = tmp_path / "checkpoint"
    trainer = tmp_path / "trainer.py"
    trainer.write_text(f"import time\ntime.sleep(1.0)\nopen({str(marker)!r}, 'w').write('ok')\n")
    launcher = tmp_path / "launcher.py"
    launcher.write_text(f"import subprocess, sys\nsubprocess.Popen([sys.executable, {str(trainer)!r}])\nsys.exit(3)\n")
    start = time.monotonic()
    # As the job script runs it, in a process of its own (a subreaper waits for all its descendants:
    # inside pytest that would include every helper process earlier tests left running).
    done = subprocess.run([sys.executable, "-m", "selfrank.launch.slurm", "supervise", sys.executable, str(launcher)],
                          cwd=REPO, timeout=600)
    assert done.returncode == 3
    assert marker.read_text() == "ok" and time.monotonic() - start >= 1.0


def test_accelerate_and_deepspeed_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    loaded = {p.name: load_config_from_file(str(p)) for p in sorted((REPO / "configs" / "accelerate").glob("*.yaml"))}
    assert set(loaded) == {"cpu_2proc.yaml", "gpu_multi.yaml", "gpu_deepspeed_zero2.yaml", "gpu_deepspeed_zero3.yaml"}
    assert loaded["cpu_2proc.yaml"].num_processes == 2 and loaded["cpu_2proc.yaml"].distributed_type == "MULTI_GPU"
    for stage in (2, 3):
        ds = loaded[f"gpu_deepspeed_zero{stage}.yaml"].deepspeed_config
        assert (REPO / ds["deepspeed_config_file"]).is_file() and ds["deepspeed_multinode_launcher"] == "standard"
    for name, stage in (("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)):
        plugin = DeepSpeedPlugin(hf_ds_config=str(REPO / "configs" / "deepspeed" / name))
        assert plugin.zero_stage == stage
        assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
    offload = json.loads((REPO / "configs" / "deepspeed" / "zero3_offload.json").read_text())
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"


CLUSTER_OPTIONS = dict(account="proj-42", qos="high", exclusive=True, mem="200G", constraint="a100&ib",
                       sbatch_lines=["--reservation=big", "--mail-type=END"], setup_lines=["module load cuda/12.4"],
                       wrap="apptainer exec --nv /images/selfrank.sif", overrides=["ppo.steps=5", "name=demo-b"],
                       force=True)


def test_cluster_options_become_sbatch_lines_setup_and_job_arguments(tmp_path):
    script = _render(tmp_path, **CLUSTER_OPTIONS)
    _bash_syntax_ok(script, tmp_path)
    opts = _sbatch_options(script)
    assert opts["--account"] == "proj-42" and opts["--qos"] == "high" and opts["--mem"] == "200G"
    assert "--exclusive" in opts and opts["--constraint"] == '"a100&ib"'  # sbatch strips the double quotes
    assert opts["--reservation"] == "big" and opts["--mail-type"] == "END"
    lines = script.splitlines()
    assert lines.index("module load cuda/12.4") < next(i for i, l in enumerate(lines) if l.startswith("srun "))
    argv = _per_node_argv(script)
    assert argv[5:10] == ["apptainer", "exec", "--nv", "/images/selfrank.sif", "$PYTHON"]
    assert argv[-8:] == ["$STAGE", "$CONFIG", "--resume", "--force", "--set", "ppo.steps=5", "--set", "name=demo-b"]


@pytest.mark.parametrize("overrides, field", [
    ({"account": "a b"}, "--account"),
    ({"qos": "x;y"}, "--qos"),
    ({"mem": "lots"}, "--mem"),
    ({"constraint": "a100 ib"}, "--constraint"),
    ({"constraint": 'a"b'}, "--constraint"),
    ({"sbatch_lines": ["--job-name=other"]}, "--sbatch: --job-name is written by"),
    ({"sbatch_lines": ["--signal=B:USR1@1"]}, "--sbatch: --signal is written by"),
    ({"sbatch_lines": ["--comment=a b"]}, "--sbatch"),
    ({"sbatch_lines": ["reservation=big"]}, "--sbatch"),
    ({"setup_lines": ["module load a\nrm -rf /"]}, "--setup"),
    ({"wrap": "  "}, "--wrap"),
    ({"overrides": ["ppo.steps"]}, "--set"),
    ({"overrides": ["a=b\nc"]}, "--set"),
])
def test_cluster_option_values_are_validated(tmp_path, overrides, field):
    with pytest.raises(UserError, match=field.replace("-", r"\-")):
        _render(tmp_path, **overrides)


@pytest.mark.parametrize("evil", EVIL)
def test_job_arguments_reach_the_trainer_verbatim(tmp_path, evil):
    """Run the per-node command for real with a stand-in Python that records its arguments: what bash
    passes on is exactly what was given, nothing is executed."""
    work = tmp_path / "work"
    work.mkdir()
    # --wrap is split into words as a shell would (so a word quoted there stays one word)
    script = _render(work, cpu=True, overrides=[f"name={evil}"], wrap=f"env {shlex.quote('SELFRANK_NOTE=' + evil)}")
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    per_node = shlex.split(srun)[-2]
    recorder = tmp_path / "python"
    recorder.write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {shlex.quote(str(tmp_path / 'argv'))}\n")
    recorder.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(recorder), "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "NUM_PROCESSES": "1", "MAIN_HOST": "localhost", "MAIN_PORT": "29500", "STAGE": "run", "CONFIG": "c.yaml"}
    done = subprocess.run(["bash", "-c", per_node], env=env, cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv[:3] == ["-m", "selfrank.launch.slurm", "supervise"]
    assert argv[3:5] == ["env", f"SELFRANK_NOTE={evil}"] and argv[-2:] == ["--set", f"name={evil}"]
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()
