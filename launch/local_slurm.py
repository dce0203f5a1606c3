"""A real one-node Slurm cluster in a temporary folder, for tests of the generated job scripts.

Needs the Debian packages ``slurm-wlm`` and ``munge`` and root (slurmd runs jobs as their owner).
Everything lives under one folder: the munge key and socket, slurm.conf, state and spool folders, logs.
Nothing under /etc is read or written: clients find the cluster through ``SLURM_CONF``, which
``LocalSlurm.env()`` returns. All three daemons run in the foreground as children of this process and
are stopped by ``stop()`` (or leaving the ``with`` block).

    with LocalSlurm(tmp_path) as cluster:
        job = cluster.submit(script_path)
        state, exit_code = cluster.wait_job(job)
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol")
FEATURES = "selfrank,fast"  # node features of the local cluster (for jobs with --constraint)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def missing_requirements() -> list[str]:
    """What prevents a local cluster here: absent programs, or not running as root."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if os.geteuid() != 0:
        missing.append("root (slurmd must run as root)")
    return missing


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create_munge_key(path: Path, size: int = 1024) -> Path:
    """A random munge key readable by its owner only (munged refuses anything looser)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(size))
    return path


def write_slurm_conf(root: Path, *, hostname: str, munge_socket: Path, ctld_port: int, slurmd_port: int,
                     cpus: int = 2, real_memory_mb: int = 1024, partition: str = "debug",
                     features: str = FEATURES) -> Path:
    """A minimal slurm.conf for one node that is also the controller; no accounting, no cgroups. The
    node advertises ``features`` (comma-separated), which jobs may ask for with ``--constraint``."""
    state, spool, logs = root / "state", root / "spool", root / "log"
    for folder in (state, spool, logs):
        folder.mkdir(parents=True, exist_ok=True)
    text = f"""\
ClusterName=selfranklocal
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={logs / 'slurmctld.log'}
SlurmdLogFile={logs / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
MinJobAge=600
KillWait=10
NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={real_memory_mb} Features={features} State=UNKNOWN
PartitionName={partition} Nodes={hostname} Default=YES MaxTime=INFINITE State=UP
"""
    path = root / "slurm.conf"
    path.write_text(text)
    return path


class LocalSlurm:
    """munged + slurmctld + slurmd for this host, under ``root``."""

    def __init__(self, root: str | os.PathLike, cpus: int = 2, partition: str = "debug"):
        self.root = Path(root)
        self.cpus = max(1, min(cpus, os.cpu_count() or 1))
        self.partition = partition
        self.hostname = socket.gethostname().split(".")[0]
        self.conf: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}

    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (sbatch, squeue...) talking to this cluster."""
        assert self.conf is not None, "cluster not started"
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stderr", "wb")
        self._procs[name] = subprocess.Popen([_which(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env() if self.conf else None, start_new_session=True)
        log.close()

    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        missing = missing_requirements()
        if missing:
            raise RuntimeError("cannot start a local Slurm cluster, missing: " + ", ".join(missing))
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "log").mkdir(exist_ok=True)
        munge_dir = self.root / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)  # clients must reach the socket inside
        key = create_munge_key(munge_dir / "munge.key")
        socket_path = munge_dir / "munge.socket"
        # --force: the temporary folder's parents (e.g. /tmp) are world-writable, which munged distrusts.
        self._spawn("munged", ["--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait_for(lambda: socket_path.exists(), timeout, "munged socket")
        page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
        memory = max(64, min(1024, page * pages // 2**20 - 256))
        self.conf = write_slurm_conf(self.root, hostname=self.hostname, munge_socket=socket_path,
                                     ctld_port=free_port(), slurmd_port=free_port(), cpus=self.cpus,
                                     real_memory_mb=memory, partition=self.partition)
        self._spawn("slurmctld", ["-D", "-i"])
        self._wait_for(lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld")
        self._spawn("slurmd", ["-D", "-N", self.hostname])
        self._wait_for(self._node_idle, timeout, "node idle in sinfo")
        logger.info("local Slurm up in %s (node %s, %d CPUs)", self.root, self.hostname, self.cpus)
        return self

    def _node_idle(self) -> bool:
        out = self._run("sinfo", "-h", "-N", "-o", "%T").stdout.split()
        return out == ["idle"]

    def _wait_for(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if check():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n" + self.logs())

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([_which(argv[0]), *argv[1:]], capture_output=True, text=True, env=self.env(),
                              timeout=30)

    def logs(self, tail: int = 40) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def submit(self, script: str | os.PathLike, *extra: str) -> str:
        done = self._run("sbatch", "--parsable", *extra, str(script))
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a mapping (JobState, ExitCode, Restarts...); works without slurmdbd."""
        done = self._run("scontrol", "show", "job", "-o", job_id)
        if done.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {done.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def wait_job(self, job_id: str, timeout: float = 60.0, states=FINAL_STATES) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; returns its final ``job_info``."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s:\n" + self.logs())
            time.sleep(0.5)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self._run("scontrol", *args)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop slurmd, slurmctld and munged, killing any that hang."""
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                import getpass

                self._run("scancel", "--quiet", f"--user={getpass.getuser()}")
                deadline = time.monotonic() + 15
                while self._run("squeue", "-h", "-o", "%i").stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.3)
            except (subprocess.SubprocessError, OSError) as exc:
                logger.warning("could not cancel the local cluster's jobs: %s", exc)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
