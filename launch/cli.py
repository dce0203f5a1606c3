"""`selfrank` command line. User mistakes (``UserError``) print one line and exit with code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from selfrank.errors import UserError

STAGE_COMMANDS = ("sft", "sample", "reward", "ppo", "eval")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfrank", description="PPO fine-tuning without human rankers (STR).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rank = sub.add_parser("rank", help="rank groups of sampled answers (JSONL in, JSONL out)")
    rank.add_argument("--input", required=True, help="JSONL: {\"id\"?, \"prompt\", \"responses\": [...]} per line")
    rank.add_argument("--output", required=True, help="JSONL with scores, order, clusters, representatives, pairs")
    rank.add_argument("--workers", type=int, default=1, help="CPU ranking worker processes (default 1)")
    rank.add_argument("--embedder", default=None, help="sentence-transformers name/folder, or 'lexical'")
    rank.add_argument("--config", default=None, help="YAML with ranking settings (top level or under 'ranking:')")
    rank.add_argument("--noise", action="store_true", help="perturb pair losers (the paper's '+ noise' variant)")

    def stage_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="experiment YAML (see configs/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set ppo.steps=10 (repeatable)")
        p.add_argument("--resume", action="store_true", help="continue from the stage's last checkpoint")
        p.add_argument("--force", action="store_true", help="redo the stage even if it is complete")

    for name in STAGE_COMMANDS:
        stage_args(sub.add_parser(name, help=f"run the {name} stage alone"))
    stage_args(sub.add_parser("run", help="run every stage, skipping the complete ones"))

    experiment = sub.add_parser("experiment", help="run a grid of tasks x seeds and write one results table")
    experiment.add_argument("grid", help="grid YAML (see configs/grid_*.yaml)")

    slurm = sub.add_parser("slurm", help="render (and submit) an sbatch script for a config")
    slurm.add_argument("config")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=1)
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", default=None, help="wall time, e.g. 24:00:00")
    slurm.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config to wire in")
    slurm.add_argument("--stage", default="run", help="stage to run (default: the whole pipeline)")
    slurm.add_argument("--output", default=None, help="where to write the script (default: runs/<name>/job.sbatch)")
    slurm.add_argument("--submit", action="store_true", help="submit with sbatch after writing")
    slurm.add_argument("--cpu", action="store_true", help="CPU-only job (gloo), e.g. for testing")
    return parser


def _cmd_rank(args) -> int:
    from selfrank.ranking.config import RankingConfig
    from selfrank.ranking.files import rank_file
    from selfrank.launch.config import build, load_yaml

    data = {}
    if args.config:
        data = load_yaml(args.config)
        data = data.get("ranking", data)
    config = build(RankingConfig, data, "ranking")
    if args.embedder:
        config.embedder.name = args.embedder
    if args.noise:
        config.noise.enabled = True
    if args.workers < 1:
        raise UserError(f"--workers: must be >= 1, got {args.workers}")
    rank_file(args.input, args.output, config, workers=args.workers)
    return 0


def _preflight(config, stages: list[str], force: bool) -> None:
    """Read the task data and find the model before anything is written, so that a bad input file or
    model name leaves the run folder exactly as it was."""
    from pathlib import Path

    from selfrank.train.data.tasks import load_task
    from selfrank.train.models.causal_lm import check_model_source
    from selfrank.train.rundir import RunDir

    root = RunDir(Path(config.output_dir) / config.name)
    todo = [stage for stage in stages if force or not root.is_done(stage)]
    data = None
    if any(stage != "reward" for stage in todo):
        data = load_task(config.task)
    if "sft" in todo:
        check_model_source(config.model)
    if todo:
        from selfrank.train.models.preflight import check_policy_settings

        check_policy_settings(config, sft_todo="sft" in todo, data=data)


def _cmd_stage(args) -> int:
    from pathlib import Path

    from selfrank.launch.config import load_experiment
    from selfrank.launch.tracking import Tracker, pipeline_callbacks
    from selfrank.train.config import STAGES
    from selfrank.train.pipeline import run_pipeline
    from selfrank.train.signals import install_stop_handlers

    config = load_experiment(args.config, args.overrides)
    stages = None if args.command == "run" else [args.command]
    _preflight(config, list(stages or STAGES), args.force)
    install_stop_handlers()
    # W&B on the main process only (a no-op tracker elsewhere); the pipeline sees plain callbacks.
    with Tracker.open(config, Path(config.output_dir) / config.name, resume=args.resume) as tracker:
        run_pipeline(config, stages=stages, resume=args.resume, force=args.force, **pipeline_callbacks(tracker))
    return 0


def _cmd_experiment(args) -> int:
    from selfrank.launch.experiment import load_grid, run_grid

    run_grid(load_grid(args.grid))
    return 0


def _cmd_slurm(args) -> int:
    from selfrank.launch.slurm import slurm_command

    return slurm_command(args)


def _quiet_libraries(verbose: bool) -> None:
    """Keep our own progress bars and logs readable: the libraries' per-load bars and save notices go."""
    if verbose:
        return
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    for name in ("httpx", "urllib3", "filelock", "datasets", "sentence_transformers", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    # Each selfrank process starts its own W&B service: one inherited from a parent process (which
    # wandb advertises through this variable) would outlive a killed run and keep its run id "in use",
    # so the resumed run could not reopen it.
    os.environ.pop("WANDB_SERVICE", None)
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _quiet_libraries(args.verbose)
    handler = {"rank": _cmd_rank, "slurm": _cmd_slurm, "experiment": _cmd_experiment}.get(args.command, _cmd_stage)
    try:
        return handler(args)
    except UserError as exc:
        print(f"selfrank: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfrank: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from selfrank.atomic import disk_full_errno
        from selfrank.train.signals import EXIT_CODE, Preempted

        if isinstance(exc, Preempted):  # 143: the job script requeues the job, which resumes
            print(f"selfrank: {exc}", file=sys.stderr)
            return EXIT_CODE
        code = disk_full_errno(exc)
        if code is None:
            raise
        where = getattr(exc, "filename", None) or "the run folder"
        print(f"selfrank: error: disk full while writing {where} ({os.strerror(code)}); "
              "free space (or raise the file size limit) and rerun with --resume", file=sys.stderr)
        return 1
    finally:
        if "torch" in sys.modules:  # a stage ran (no need to import torch only to find no process group)
            from selfrank.train.dist import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
