"""Weights & Biases tracking for one run folder: rank 0 only.

``Tracker.open`` returns a real tracker on the main process and a no-op one everywhere else (and when
tracking is disabled), so stage code calls ``log``/``log_table``/``finish`` without asking who it is.

* Mode: ``tracking.wandb`` in the config: "disabled" (the default), "offline" (files in
  ``runs/<name>/wandb/``, uploaded later with ``wandb sync``) or "online". "online" needs W&B
  credentials as wandb itself finds them (``wandb login``'s netrc entry, ``WANDB_API_KEY``, or
  ``WANDB_IDENTITY_TOKEN_FILE``); without any the run is kept offline, with a warning, rather than
  failing a job after hours in a queue.
* Identity: the W&B run id is written once to ``<run_dir>/wandb_id.txt``; ``resume=True`` reuses it
  (``resume="allow"``), so a requeued or restarted job continues the same W&B run.
* Each stage logs under its own prefix (``sft/``, ``reward/``, ``ppo/``...) against its own step axis
  (``<stage>/step``): stages count steps from 0 and W&B drops points whose global step goes back.
  PPO's per-step metrics go under TRL's names (``ppo/<variant>/objective/kl``, ...; see
  :data:`TRL_NAMES`), so dashboards made for TRL's PPO trainer read them; ``log.jsonl`` keeps PPO's own.
* The logged config passes through ``launch.secrets.redact``.
* ``finish`` returns once the run's files are complete (the W&B service writes them after the run
  itself reports finished, so it is shut down and waited for).
"""
from __future__ import annotations

import logging
import os
import secrets as _random
from pathlib import Path
from typing import Any, Iterable, Sequence

from selfrank.launch.secrets import install_log_redaction, redact
from selfrank.atomic import write_text
from selfrank.errors import UserError
from selfrank.train.config import STAGES, ExperimentConfig

logger = logging.getLogger(__name__)

ID_FILE = "wandb_id.txt"
# Columns of the sampled-answers table (see ``sample_rows``).
SAMPLE_COLUMNS = ["id", "prompt", "response", "textrank_score", "rank", "cluster", "representative", "role",
                  "reward"]
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def process_rank() -> int:
    """Global rank of this process: torch.distributed when initialised, else the launcher's RANK."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", "0") or 0)


def has_credentials(environ: dict | None = None) -> bool:
    """Whether wandb would find credentials: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or the
    netrc entry ``wandb login`` writes for the W&B host (``WANDB_BASE_URL``, default api.wandb.ai)."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:  # wandb's own reader (private module: its location changes between versions)
        from wandb.sdk.lib.wbauth import wbnetrc

        return bool(wbnetrc.read_netrc_auth(host=host))
    except ImportError:
        pass
    except Exception as exc:  # a malformed entry: wandb would refuse it too
        logger.warning("W&B credentials in netrc are unusable: %s", exc)
        return False
    import netrc
    from urllib.parse import urlparse

    path = environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entry = netrc.netrc(path).authenticators(urlparse(host).hostname or host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(requested: str, environ: dict | None = None, quiet: bool = False) -> str:
    """The W&B mode to use: "disabled", "offline", or "online" (only when wandb finds credentials)."""
    environ = os.environ if environ is None else environ
    if requested not in ("online", "offline", "disabled"):
        raise UserError(f"tracking.wandb: must be one of online, offline, disabled; got {requested!r}")
    if requested == "online" and not has_credentials(environ):
        if not quiet:
            logger.warning("tracking.wandb is 'online' but no W&B credentials were found (run `wandb login` "
                           "or set WANDB_API_KEY): logging offline (upload later with `wandb sync`)")
        return "offline"
    return requested


def run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id of this run folder: reused on resume, otherwise freshly drawn and saved."""
    path = Path(run_dir) / ID_FILE
    if resume and path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if stored and all(c in _ID_ALPHABET for c in stored):
            return stored
        logger.warning("%s: not a valid run id, starting a new W&B run", path)
    new = "".join(_random.choice(_ID_ALPHABET) for _ in range(12))
    write_text(path, new + "\n")
    return new


def sample_rows(groups: Iterable[dict], rewards: dict[tuple[str, int], float] | None = None,
                max_rows: int | None = 200) -> list[list]:
    """Rows for the sampled-answers table from ``RankedGroup.to_json()`` dicts.

    One row per answer: its TextRank score and rank, ISODATA cluster, whether it is its cluster's
    representative, its role in the training pairs ("winner", "loser", "both" or "none") and its
    reward: ``rewards[(group_id, answer_index)]`` when given, else the group's own ``"rewards"`` list
    (one per answer, as the reward stage adds them), else None.
    """
    rows: list[list] = []
    for group in groups:
        winners = {w for w, _ in group.get("pairs", [])}
        losers = {l for _, l in group.get("pairs", [])}
        rank_of = {index: position for position, index in enumerate(group.get("order", []))}
        reps = set(group.get("representatives", []))
        clusters = group.get("clusters") or [None] * len(group["responses"])
        own = group.get("rewards")
        for i, response in enumerate(group["responses"]):
            role = ("both" if i in winners and i in losers else "winner" if i in winners
                    else "loser" if i in losers else "none")
            if rewards is not None:
                reward = rewards.get((str(group.get("id")), i))
            else:
                reward = float(own[i]) if own is not None else None
            rows.append([str(group.get("id")), group.get("prompt", ""), response, float(group["scores"][i]),
                         rank_of.get(i), clusters[i], i in reps, role, reward])
            if max_rows is not None and len(rows) >= max_rows:
                return rows
    return rows


# PPO's log names -> the names TRL's PPO trainer logs (what TRL dashboards read); others keep their own.
TRL_NAMES = {
    "objective/kl": "objective/kl",  # mean over answers of the summed per-token k1 = log pi - log pi_ref
    "objective/entropy": "objective/entropy",
    "objective/rlhf_reward": "objective/rlhf_reward",  # score - kl_coef * KL, per answer
    "reward/penalized_mean": "objective/scores",  # RM scores after the missing-EOS penalty
    "policy/approxkl": "policy/approxkl_avg",
    "policy/clipfrac": "policy/clipfrac_avg",
    "loss/policy": "loss/policy_avg",
    "loss/value": "loss/value_avg",
    "value/clipfrac": "val/clipfrac_avg",
    "policy/ratio": "val/ratio",
    "episodes": "episode",
}


def trl_metrics(row: dict[str, Any], ppo, variants: Iterable[str] = ()) -> dict[str, Any]:
    """One PPO step's row (``train.stages.ppo``; keys under ``<variant>/`` for a variant in ``variants``)
    under TRL's names, plus TRL's ``lr`` (the actor's: PPO runs without a schedule) and ``eps``
    (episodes per second of the step)."""
    out: dict[str, Any] = {}
    prefixes = set()
    for key, value in row.items():
        prefix = next((f"{v}/" for v in variants if key.startswith(f"{v}/")), "")
        name = key[len(prefix):]
        prefixes.add(prefix)
        out[prefix + TRL_NAMES.get(name, name)] = value
    episodes_per_step = ppo.batch_size * ppo.samples_per_prompt
    for prefix in prefixes:
        out[prefix + "lr"] = ppo.lr
        step_s = row.get(prefix + "time/step_s")
        if isinstance(step_s, (int, float)) and step_s > 0:
            out[prefix + "eps"] = episodes_per_step / step_s
    return out


# After a kill, the dead process's W&B service can hold its run open for a while: a resumed job waits
# for it rather than forking the run's history.
RUN_IN_USE_WAIT_S = 60.0


def _init_with_retry(wandb, identifier: str, settings: dict):
    import time

    deadline = time.monotonic() + RUN_IN_USE_WAIT_S
    while True:
        try:
            return wandb.init(id=identifier, **settings)
        except Exception as exc:  # wandb raises its own error types, which differ by version
            if "in use" not in str(exc) or time.monotonic() > deadline:
                raise
            logger.info("W&B run %s is still held by a previous process; waiting", identifier)
            time.sleep(2.0)


class Tracker:
    """Logs one run to W&B. Build it with ``Tracker.open``; a disabled tracker ignores every call."""

    def __init__(self, run=None):
        self._run = run
        self._axes: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self._run is not None

    @property
    def id(self) -> str | None:
        return self._run.id if self._run is not None else None

    @property
    def run(self):
        """The underlying ``wandb`` run, or None when disabled."""
        return self._run

    @classmethod
    def open(cls, config: ExperimentConfig, run_dir: str | os.PathLike, resume: bool,
             *, is_main: bool | None = None) -> "Tracker":
        """Start (or resume) the run folder's W&B run on the main process; a no-op tracker elsewhere."""
        if is_main is None:
            is_main = process_rank() == 0
        if not is_main:
            return cls(None)
        mode = resolve_mode(config.tracking.wandb)
        if mode == "disabled":
            return cls(None)
        install_log_redaction()
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        identifier = run_id(run_dir, resume)
        settings = dict(
            project=config.tracking.project,
            entity=config.tracking.entity,
            name=config.name,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=redact(config),
            # Console capture would copy every printed line (and any secret in it) into the run;
            # the job's own logs already keep the console.
            settings=wandb.Settings(console="off", silent=True),
        )
        run = _init_with_retry(wandb, identifier, settings)
        logger.info("W&B %s run %s in %s", mode, run.id, run_dir)
        return cls(run)

    def _prefixed(self, metrics: dict[str, Any], stage: str) -> dict[str, Any]:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
        return {k if k.startswith(f"{stage}/") else f"{stage}/{k}": v for k, v in metrics.items()}

    def _axis(self, stage: str) -> str:
        axis = f"{stage}/step"
        if axis not in self._axes:
            self._run.define_metric(axis, hidden=True)
            self._run.define_metric(f"{stage}/*", step_metric=axis)
            self._axes.add(axis)
        return axis

    def log(self, metrics: dict[str, Any], step: int, stage: str) -> None:
        """Log scalars as ``<stage>/<name>`` at ``step`` of that stage's own axis."""
        if self._run is None:
            return
        data = self._prefixed(metrics, stage)
        data[self._axis(stage)] = step
        self._run.log(data)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                  stage: str = "sample", step: int | None = None) -> None:
        """Log a table (e.g. sampled answers with scores, clusters, pair roles, rewards) as ``<stage>/<name>``."""
        if self._run is None:
            return
        import wandb

        width = len(columns)
        for i, row in enumerate(rows):
            if len(row) != width:
                raise ValueError(f"table {name!r}: row {i} has {len(row)} values for {width} columns")
        table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        data = self._prefixed({name: table}, stage)
        if step is not None:
            data[self._axis(stage)] = step
        self._run.log(data)

    def log_artifact_files(self, paths: Iterable[str | os.PathLike], name: str = "eval-report",
                           kind: str = "evaluation") -> None:
        """Upload files (the eval report, its plots) as one versioned artifact of this run."""
        if self._run is None:
            return
        import wandb

        artifact = wandb.Artifact(name, type=kind)
        count = 0
        for path in paths:
            path = Path(path)
            if not path.is_file():
                raise UserError(f"{path}: file to track not found")
            artifact.add_file(str(path), name=path.name)
            count += 1
        if count:
            self._run.log_artifact(artifact)

    def summary(self, values: dict[str, Any], stage: str) -> None:
        """Record final values (e.g. a stage's DONE summary) in the run summary."""
        if self._run is None:
            return
        for key, value in self._prefixed(redact(values), stage).items():
            self._run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        """End the run; returns once its files are complete."""
        if self._run is None:
            return
        import wandb

        self._run.finish(exit_code=exit_code)
        self._run = None
        # ``finish`` returns when the service has taken the run's last records, but the service writes
        # the run's transaction log (``run-<id>.wandb``) on its own schedule: read right away, the file
        # could still be a bare header. Shutting the service down waits until every file is closed
        # (the next run starts a new service, in under a second).
        wandb.teardown()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def pipeline_callbacks(tracker: Tracker, config: ExperimentConfig | None = None) -> dict:
    """The tracking callbacks ``train.pipeline.run_pipeline`` takes (``log``, ``log_table``, ``log_files``).

    ``train`` never imports ``launch``: the pipeline calls these plain functions, which put PPO's
    metrics under TRL's names (:func:`trl_metrics`, with ``config``), render ranked groups as the
    sampled-answers table (:func:`sample_rows`; the reward column only when the groups carry rewards)
    and report files as an artifact.
    """
    def log(metrics: dict, step: int, stage: str) -> None:
        if stage == "ppo" and config is not None:
            metrics = trl_metrics(metrics, config.ppo, config.variants)
        tracker.log(metrics, step, stage)

    def log_table(name: str, groups: list[dict], stage: str) -> None:
        rows = sample_rows(groups)
        if any(row[-1] is not None for row in rows):
            tracker.log_table(name, SAMPLE_COLUMNS, rows, stage=stage)
        else:  # no rewards yet (the sample stage): no empty column
            tracker.log_table(name, SAMPLE_COLUMNS[:-1], [row[:-1] for row in rows], stage=stage)

    return {"log": log, "log_table": log_table,
            "log_files": lambda paths: tracker.log_artifact_files(paths)}
