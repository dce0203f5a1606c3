"""Render (and submit) the sbatch script that runs an experiment on a Slurm cluster.
(Longer than most modules on purpose: the script template, the quoting of every value put into it and
the checks of the options that fill it are one contract with the cluster, kept in one place.)

The job runs one task per node; each task starts ``accelerate launch`` for that node's processes,
with the machine rank taken from the node's own ``SLURM_NODEID`` and the rendezvous address from the
first host of the allocation. The pipeline always runs with ``--resume``: a requeued job (after
preemption, a node failure or the time limit) continues from the last checkpoint.

Preemption: Slurm sends SIGUSR1 to the batch shell 120 s before the end (``--signal=B:USR1@120``);
the script forwards SIGTERM to the trainer, waits for it to checkpoint and exit, then requeues itself.

Every value that reaches the script is validated and shell-quoted (``shlex.quote``); the launch line
itself only reads shell variables assigned above it, so no argument can become code.
"""
from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from selfrank.atomic import write_text
from selfrank.errors import UserError

logger = logging.getLogger(__name__)

_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_PARTITION = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or no limit.
_TIME = re.compile(r"\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
                   r"|UNLIMITED|INFINITE|unlimited|infinite")
# The signal arrives this many seconds before the time limit: enough to write a checkpoint.
SIGNAL_LEAD_S = 120
_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,128}")  # Slurm account / QOS names
_MEM = re.compile(r"\d+[KMGT]?")
# sbatch's feature expressions: names joined by & | , with optional [..] groups and *count.
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.:=\-&|,*\[\]()!]+")
_SBATCH_OPTION = re.compile(r"--[a-z][a-z0-9-]*(=[^\s'\"\\$`]+)?")
# Options the script sets itself (each has its own flag, or is what requeueing relies on).
_OWN_OPTIONS = ("job-name", "nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node", "partition", "time",
                "output", "error", "open-mode", "requeue", "signal", "account", "qos", "exclusive", "mem",
                "constraint")


def _check_text(name: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{name}: must be a non-empty string")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UserError(f"{name}: control characters (newline, tab...) are not allowed: {value!r}")
    return value


def _check_path(name: str, value: str | Path) -> str:
    # sbatch reads #SBATCH lines itself, so paths appearing there must need no quoting at all.
    text = _check_text(name, str(value))
    if re.search(r"[\s'\"\\$`%]", text):
        raise UserError(f"{name}: spaces, quotes, '\\', '$', '`' and '%' are not supported in paths: {text!r}")
    return text


def _check_pattern(name: str, value: str, pattern: re.Pattern, what: str) -> str:
    if not pattern.fullmatch(_check_text(name, value)):
        raise UserError(f"{name}: {what}, got {value!r}")
    return value


def _check_sbatch_option(option: str) -> str:
    _check_pattern("--sbatch", option, _SBATCH_OPTION,
                   "one option as on an #SBATCH line, e.g. --reservation=big (no spaces or quotes)")
    name = option[2:].split("=", 1)[0]
    if name in _OWN_OPTIONS:
        raise UserError(f"--sbatch: --{name} is written by `selfrank slurm` itself (from the config's name, "
                        "its own flags, or what requeueing needs); use its flag instead, see --help")
    return option


def validate_time(value: str) -> str:
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        raise UserError(f"--time: expected a Slurm time (MM, HH:MM:SS, D-HH:MM:SS or UNLIMITED), got {value!r}")
    return value


def _accelerate_flags(nodes: int, processes_per_node: int, cpu: bool, deepspeed: bool, mixed_precision: str) -> list[str]:
    flags = []
    if deepspeed:
        # "standard" = one accelerate per node (started by srun) instead of DeepSpeed's own pdsh fan-out.
        flags += ["--use_deepspeed", "--deepspeed_config_file", '"$DEEPSPEED_CONFIG"',
                  "--deepspeed_multinode_launcher", "standard"]
    elif nodes * processes_per_node > 1:
        # On CPU too: --multi_gpu is what makes accelerate start a synchronised (gloo) process group;
        # --cpu would silently run a single process.
        flags.append("--multi_gpu")
    flags += ["--mixed_precision", "no" if cpu else mixed_precision, "--dynamo_backend", "no"]
    return flags


def render_sbatch(
    config_path: str | Path,
    *,
    job_name: str,
    nodes: int = 1,
    gpus_per_node: int = 1,
    partition: str | None = None,
    time: str | None = None,
    deepspeed_config: str | Path | None = None,
    stage: str = "run",
    cpu: bool = False,
    run_dir: str | Path,
    extra_env: Mapping[str, str] | None = None,
    cpus_per_task: int | None = None,
    mixed_precision: str = "no",
    main_port: int | None = None,
    workdir: str | Path | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    account: str | None = None,
    qos: str | None = None,
    exclusive: bool = False,
    mem: str | None = None,
    constraint: str | None = None,
    sbatch_lines: Sequence[str] = (),
    setup_lines: Sequence[str] = (),
    wrap: str | None = None,
    _program: Sequence[str] | None = None,
) -> str:
    """The text of an sbatch script running ``selfrank <stage> CONFIG --resume`` on ``nodes`` nodes.

    ``gpus_per_node`` is the number of processes per node (one per GPU); with ``cpu`` it is the number
    of CPU processes per node and no GPUs are requested. ``main_port`` defaults to a port derived
    from the job id, so two jobs sharing a node do not collide. ``overrides`` (``KEY=VALUE``) go to the
    job's ``selfrank`` as ``--set``, ``force`` as ``--force``. ``account``, ``qos``, ``exclusive``,
    ``mem``, ``constraint`` and ``sbatch_lines`` (whole options, e.g. ``--reservation=big``) become
    ``#SBATCH`` lines. ``setup_lines`` are shell lines run in the batch shell before the launch
    (``module load ...``; their environment reaches every node's processes). ``wrap`` is a command the
    trainer runs inside on each node (``apptainer exec --nv image.sif``), quoted word by word.
    ``_program`` replaces the arguments after ``accelerate launch`` (internal: tests point it at a quick
    command).
    """
    from selfrank.train.config import STAGES

    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise UserError(f"--nodes: must be an integer >= 1, got {nodes!r}")
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise UserError(f"--gpus-per-node: must be an integer >= 1, got {gpus_per_node!r}")
    if stage not in (*STAGES, "run"):
        raise UserError(f"--stage: must be one of run, {', '.join(STAGES)}; got {stage!r}")
    _check_text("job name", job_name)
    if not _JOB_NAME.fullmatch(job_name):
        raise UserError(f"job name: letters, digits, '.', '_', '+' and '-' only (at most 128), got {job_name!r}")
    if partition is not None and not _PARTITION.fullmatch(_check_text("--partition", partition)):
        raise UserError(f"--partition: a partition name or comma-separated names, got {partition!r}")
    if time is not None:
        validate_time(time)
    if mixed_precision not in ("no", "fp16", "bf16", "fp8"):
        raise UserError(f"mixed precision: must be no, fp16, bf16 or fp8; got {mixed_precision!r}")
    if cpus_per_task is None:
        cpus_per_task = gpus_per_node if cpu else 8 * gpus_per_node
    if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, int) or cpus_per_task < 1:
        raise UserError(f"cpus per task: must be an integer >= 1, got {cpus_per_task!r}")
    if main_port is not None and not (isinstance(main_port, int) and 1024 <= main_port <= 65535):
        raise UserError(f"main port: must be an integer in 1024..65535, got {main_port!r}")
    env = dict(extra_env or {})
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise UserError(f"environment variable name {key!r}: letters, digits and '_' only")
        if str(value):
            _check_text(f"environment variable {key}", str(value))

    if account is not None:
        _check_pattern("--account", account, _NAME, "an account name (letters, digits, '_', '.', '+', '-')")
    if qos is not None:
        _check_pattern("--qos", qos, _NAME, "a QOS name (letters, digits, '_', '.', '+', '-')")
    if mem is not None:
        _check_pattern("--mem", mem, _MEM, "a size such as 64G, 512000M or 0 (all of the node's memory)")
    if constraint is not None:
        _check_pattern("--constraint", constraint, _CONSTRAINT, "a feature expression such as a100 or 'a100&ib'")
    extra_options = [_check_sbatch_option(option) for option in sbatch_lines]
    setup = [_check_text("--setup", line) for line in setup_lines]
    wrap_words = shlex.split(_check_text("--wrap", wrap)) if wrap is not None else []
    if wrap is not None and not wrap_words:
        raise UserError("--wrap: give the command to run the trainer inside, e.g. 'apptainer exec --nv image.sif'")
    for item in overrides:
        if "=" not in _check_text("--set", item):
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. ppo.steps=10")

    run_dir = Path(_check_path("run folder", Path(run_dir).absolute()))
    workdir = Path(_check_text("work folder", str(Path(workdir or Path.cwd()).absolute())))
    config_abs = _check_text("config path", str(workdir / config_path))
    q = shlex.quote

    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={q(job_name)}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
    ]
    if not cpu:
        head.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        head.append(f"#SBATCH --partition={q(partition)}")
    if time:
        head.append(f"#SBATCH --time={q(time)}")
    if account:
        head.append(f"#SBATCH --account={q(account)}")
    if qos:
        head.append(f"#SBATCH --qos={q(qos)}")
    if exclusive:
        head.append("#SBATCH --exclusive")
    if mem is not None:
        head.append(f"#SBATCH --mem={q(mem)}")
    if constraint:
        # sbatch reads its own lines (no shell): double quotes, which it strips, keep '&' and '|' as text.
        head.append(f'#SBATCH --constraint="{constraint}"')
    head += [f"#SBATCH {option}" for option in extra_options]
    head += [
        f"#SBATCH --output={q(str(run_dir / 'slurm-%j.out'))}",
        f"#SBATCH --error={q(str(run_dir / 'slurm-%j.err'))}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{SIGNAL_LEAD_S}",
        "",
        "# Generated by `selfrank slurm`: the pipeline always resumes from its last checkpoint, so the",
        "# job can be requeued (by the preemption trap below, or by the cluster) at any time.",
        "set -uo pipefail",
        "",
    ]

    assign = [
        f"cd {q(str(workdir))} || exit 1",
        f"PYTHON={q(sys.executable)}",
        f"CONFIG={q(config_abs)}",
        f"STAGE={q(stage)}",
        f"PROCS_PER_NODE={gpus_per_node}",
    ]
    if deepspeed_config is not None:
        assign.append(f"export DEEPSPEED_CONFIG={q(str(workdir / deepspeed_config))}")
    for key, value in env.items():
        assign.append(f"export {key}={q(str(value))}")
    if cpu:
        assign += ["export ACCELERATE_USE_CPU=1", f"export OMP_NUM_THREADS={max(1, cpus_per_task // gpus_per_node)}"]
    if setup:
        assign += ["", "# Set-up lines given to `selfrank slurm --setup`, as written:", *setup, ""]
    port = str(main_port) if main_port is not None else "$((20000 + SLURM_JOB_ID % 20000))"
    assign += [
        'export MAIN_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MAIN_PORT={port}",
        'export NUM_PROCESSES="$((SLURM_NNODES * PROCS_PER_NODE))"',
        'export PYTHON CONFIG STAGE',
    ]

    program = (list(_program) if _program is not None
               else ["-m", "selfrank", '"$STAGE"', '"$CONFIG"', "--resume"]
               + (["--force"] if force else []) + [a for item in overrides for a in ("--set", q(item))])
    if _program is not None:
        program = [q(a) for a in program]
    launch = " ".join([
        *(q(word) for word in wrap_words),
        '"$PYTHON" -m accelerate.commands.launch',
        '--num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID"',
        '--num_processes "$NUM_PROCESSES" --main_process_ip "$MAIN_HOST" --main_process_port "$MAIN_PORT"',
        *_accelerate_flags(nodes, gpus_per_node, cpu, deepspeed_config is not None, mixed_precision),
        *program,
    ])
    # srun starts one task per node; single quotes keep $SLURM_NODEID for each node's own shell.
    # `supervise` stays until every process the launcher started has exited, so a trainer still
    # writing its checkpoint after SIGTERM is not killed with its step.
    per_node = 'exec "$PYTHON" -m selfrank.launch.slurm supervise ' + launch
    body = [
        "",
        "TRAINER_PID=",
        "REQUEUE=0",
        "on_preempt() {",
        '    echo "selfrank: job $SLURM_JOB_ID signalled: checkpointing, then requeueing" >&2',
        "    REQUEUE=1",
        "    # srun itself would kill the step on SIGTERM: signal the step's processes instead.",
        '    if [ -n "$TRAINER_PID" ]; then scancel --signal=TERM "$SLURM_JOB_ID.0" 2>/dev/null; fi',
        "}",
        "trap on_preempt USR1 TERM",
        "",
        'echo "selfrank: job $SLURM_JOB_ID on $SLURM_NNODES node(s), main $MAIN_HOST:$MAIN_PORT, '
        'restart ${SLURM_RESTART_COUNT:-0}" >&2',
        f"srun --nodes=\"$SLURM_NNODES\" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {q(per_node)} &",
        "TRAINER_PID=$!",
        "# `wait` returns early when a trapped signal arrives: keep waiting for the trainer to finish.",
        "while true; do",
        '    wait "$TRAINER_PID"',
        "    STATUS=$?",
        '    if [ "$STATUS" -gt 128 ] && kill -0 "$TRAINER_PID" 2>/dev/null; then continue; fi',
        "    break",
        "done",
        'if [ "$REQUEUE" = 1 ]; then',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'exit "$STATUS"',
        "",
    ]
    return "\n".join(head + assign + body)


def supervise(argv: Sequence[str]) -> int:
    """Run ``argv``; on SIGTERM/SIGINT pass SIGTERM on; return once every descendant has exited.

    A launcher may exit on SIGTERM before the trainer it started has saved its checkpoint, and Slurm
    kills whatever is left in a step once its task exits. As a child subreaper this process inherits
    such orphans and waits for them too. Returns the launcher's exit code (128 + signal if killed).
    """
    import ctypes
    import os
    import signal

    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) != 0:
        logger.warning("could not become a child subreaper: orphaned trainers are not waited for")
    child = subprocess.Popen(list(argv))
    status: int | None = None

    def forward(signum, frame) -> None:
        if status is None:
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(raw)
            status = 128 - code if code < 0 else code
    return 1 if status is None else status


def slurm_command(args) -> int:
    """`selfrank slurm`: check the config for the job's world size, write the job script (atomically)
    and optionally submit it."""
    from selfrank.launch.config import load_experiment
    from selfrank.launch.preflight import preflight
    from selfrank.train.config import STAGES

    overrides = list(getattr(args, "overrides", []) or [])
    config = load_experiment(args.config, overrides)
    run_dir = Path(config.output_dir) / config.name
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed is not None:
        import json

        path = Path(deepspeed)
        if not path.is_file():
            raise UserError(f"--deepspeed: {path}: file not found")
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"--deepspeed: {path}: not valid JSON ({exc})") from None
    for value, flag in ((args.nodes, "--nodes"), (args.gpus_per_node, "--gpus-per-node")):
        if value < 1:
            raise UserError(f"{flag}: must be an integer >= 1, got {value}")
    stage = args.stage
    if stage not in (*STAGES, "run"):
        raise UserError(f"--stage: must be one of run, {', '.join(STAGES)}; got {stage!r}")
    force = getattr(args, "force", False)
    # What the job would refuse after its wait in the queue, refused now: the batch layouts for its
    # world size, the rerun policy (the job resumes), WordNet for its eval stage.
    preflight(config, list(STAGES) if stage == "run" else [stage], world=args.nodes * args.gpus_per_node,
              resume=True, force=force, redo=force and stage != "run", later=True)
    script = render_sbatch(
        args.config,
        job_name=config.name,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        time=args.time,
        deepspeed_config=deepspeed,
        stage=stage,
        cpu=args.cpu,
        run_dir=run_dir,
        mixed_precision=config.model.mixed_precision,
        overrides=overrides,
        force=force,
        account=getattr(args, "account", None),
        qos=getattr(args, "qos", None),
        exclusive=getattr(args, "exclusive", False),
        mem=getattr(args, "mem", None),
        constraint=getattr(args, "constraint", None),
        sbatch_lines=getattr(args, "sbatch_lines", []) or [],
        setup_lines=getattr(args, "setup_lines", []) or [],
        wrap=getattr(args, "wrap", None),
    )
    target = Path(args.output) if args.output else run_dir / "job.sbatch"
    write_text(target, script)
    run_dir.mkdir(parents=True, exist_ok=True)  # sbatch opens its log files there before the job starts
    print(f"wrote {target}")
    if args.submit:
        job = submit(target)
        print(f"submitted job {job}; its log: {run_dir.absolute() / f'slurm-{job}.out'}")
    return 0


def submit(script: str | Path) -> str:
    """Submit with ``sbatch --parsable``; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("sbatch: not found on PATH (submit from a Slurm login node, or drop --submit)")
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"sbatch {script}: {done.stderr.strip() or 'failed'}")
    return done.stdout.strip().split(";")[0]


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "supervise":
        sys.exit(supervise(sys.argv[2:]))
    sys.exit("usage: python -m selfrank.launch.slurm supervise PROGRAM [ARGS...]")
