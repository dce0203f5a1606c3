"""`selfrank` command line. User mistakes (``UserError``) print one line and exit with code 2.

Every entry point checks what it can before the first stage runs (``launch.preflight``), says what it
will do with each stage, and ends by naming where its results are. Ctrl-C, SIGTERM and SIGUSR1 stop
at the next step boundary with a checkpoint and print the command that continues the run.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import textwrap

from selfrank.errors import UserError

STAGE_COMMANDS = ("sft", "sample", "reward", "ppo", "eval")

_RESULTS = """\
Results go to <output_dir>/<name>/ (output_dir defaults to runs/, relative to the current directory):
sft/ (SFT and baseline models), sample/ (ranked answers, pairs), reward/<variant>/, ppo/<variant>/
(policy, critic, log.jsonl) and eval/report.md (with report.json and plots). The last line printed is
the report's path.

Variants of a run: settings changed with --set apply to the same run folder, where finished stages
made with other settings are refused (nothing is replaced without --force). To keep a variant apart,
give it its own folder: --set name=demo-k16 writes runs/demo-k16/.
"""

_FORCE_RUN = ("replace finished stages whose settings changed, and start over unfinished stages instead of "
              "continuing their checkpoints (without --force both are refused before anything runs); a finished "
              "stage stays in place until its replacement is complete")
_FORCE_STAGE = _FORCE_RUN + "; also redo the stage when it is complete and current"

_RANK_EPILOG = """\
Input: one JSON object per line, {"id"?: str|int, "prompt": str, "responses": [str, ...]}; other fields
are kept. Output: the same lines, in the same order, with these fields added (indices point into
"responses"): "id" (the line number when absent), "scores" (TextRank centrality per response), "order"
(indices best first), "clusters" (ISODATA cluster per response), "representatives" (one index per
cluster, its medoid, best first), "pairs" ([[winner, loser], ...] training pairs) and "noise" (one
entry per pair: null, or with --noise {"kind", "text", "detail"}: the loser perturbed). See the README.
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfrank", formatter_class=_formatter,
        description="PPO fine-tuning of causal LMs without human rankers (STR: self-supervised text ranking).",
        epilog="Run 'selfrank COMMAND --help' for a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rank = sub.add_parser("rank", help="rank groups of sampled answers (JSONL in, JSONL out)",
                          description=_wrap("Rank each line's answers with STR (TextRank over Sentence-BERT "
                                            "similarities, ISODATA clusters, training pairs)."),
                          epilog=_RANK_EPILOG, formatter_class=_formatter)
    rank.add_argument("--input", required=True, metavar="FILE", help="JSONL of answer groups (see below)")
    rank.add_argument("--output", required=True, metavar="FILE",
                      help="JSONL written atomically once every group is ranked (must not be the input)")
    rank.add_argument("--workers", type=int, default=1, metavar="N",
                      help="CPU ranking worker processes (default 1: rank in this process)")
    rank.add_argument("--embedder", default=None, metavar="NAME",
                      help="sentence-transformers name or folder, or 'lexical' (default: the config's, "
                           "all-MiniLM-L6-v2)")
    rank.add_argument("--config", default=None, metavar="YAML",
                      help="ranking settings, at the top level or under 'ranking:' (see ranking/config.py)")
    rank.add_argument("--noise", action="store_true",
                      help="perturb a share of the pairs' losers (ranking.noise.probability; the paper's '+ noise'), "
                           "recorded in 'noise'")

    def stage_args(p: argparse.ArgumentParser, force_help: str) -> None:
        p.add_argument("config", help="experiment YAML (see configs/); a YAML states what differs from the "
                                      "defaults in train/config.py")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting (repeatable), e.g. --set ppo.steps=50; --set name=NEW_NAME "
                            "writes to its own run folder")
        p.add_argument("--resume", action="store_true",
                       help="continue unfinished stages from their checkpoints (exactly where they stopped)")
        p.add_argument("--force", action="store_true", help=force_help)
        p.add_argument("--dry-run", action="store_true",
                       help="run every check and print what each stage would do, then stop")

    for name in STAGE_COMMANDS:
        stage_args(sub.add_parser(name, help=f"run the {name} stage alone", formatter_class=_formatter,
                                  description=f"Run the {name} stage alone (its earlier stages must be complete).",
                                  epilog=_RESULTS), _FORCE_STAGE)
    stage_args(sub.add_parser("run", help="run every stage, skipping the complete ones", formatter_class=_formatter,
                              description=_wrap("Run sft -> sample -> reward -> ppo -> eval, skipping stages "
                                                "that are complete with the same settings."),
                              epilog=_RESULTS), _FORCE_RUN)

    experiment = sub.add_parser(
        "experiment", help="run a grid of tasks x seeds and write one results table", formatter_class=_formatter,
        description=_wrap("Run every (task, seed) of a grid as an ordinary run (runs/<grid>/<task>-s<seed>/), "
                          "then pool them into results.md, results.json and results.png in runs/<grid>/."),
        epilog="Completed stages are reused (each run resumes), so rerunning a grid does only what is missing.")
    experiment.add_argument("grid", help="grid YAML (see configs/grid_*.yaml)")
    experiment.add_argument("--force", action="store_true", help=_FORCE_RUN)

    slurm = sub.add_parser(
        "slurm", help="render (and submit) an sbatch script for a config", formatter_class=_formatter,
        description=_wrap("Write an sbatch script that runs the pipeline on NODES x GPUS_PER_NODE processes "
                          "(one task per node, accelerate launch on each); the job always resumes, so it can be "
                          "requeued. The config is checked for that world size before the script is written."),
        epilog=_wrap("Values are validated and quoted; --setup lines are shell code of your own, placed as written "
                     "before the launch. The script is runs/<name>/job.sbatch; the job's output goes to "
                     "runs/<name>/slurm-<jobid>.out and .err."))
    slurm.add_argument("config", help="experiment YAML")
    slurm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting in the job (repeatable), as for 'selfrank run'")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=1, metavar="N",
                       help="GPUs, and so processes, per node (default 1); with --cpu: CPU processes per node")
    slurm.add_argument("--partition", default=None, help="Slurm partition(s), comma-separated")
    slurm.add_argument("--time", default=None, help="wall time, e.g. 24:00:00 or 1-00:00:00")
    slurm.add_argument("--account", default=None, help="account to charge (#SBATCH --account)")
    slurm.add_argument("--qos", default=None, help="quality of service (#SBATCH --qos)")
    slurm.add_argument("--exclusive", action="store_true", help="whole nodes only (#SBATCH --exclusive)")
    slurm.add_argument("--mem", default=None, help="memory per node, e.g. 200G or 0 for all (#SBATCH --mem)")
    slurm.add_argument("--constraint", default=None, help="node features, e.g. 'a100&ib' (#SBATCH --constraint)")
    slurm.add_argument("--sbatch", dest="sbatch_lines", action="append", default=[], metavar="OPTION",
                       help="one more #SBATCH option, e.g. --sbatch=--reservation=big (repeatable)")
    slurm.add_argument("--setup", dest="setup_lines", action="append", default=[], metavar="LINE",
                       help="a shell line run before the launch, e.g. 'module load cuda/12.4' (repeatable)")
    slurm.add_argument("--wrap", default=None, metavar="COMMAND",
                       help="run the trainer inside this command on each node, e.g. "
                            "'apptainer exec --nv selfrank.sif' (words are quoted one by one)")
    slurm.add_argument("--deepspeed", default=None, metavar="JSON", help="DeepSpeed config to wire in")
    slurm.add_argument("--stage", default="run", help="stage to run (default: run, the whole pipeline)")
    slurm.add_argument("--force", action="store_true", help="pass --force to the job (see 'selfrank run --help')")
    slurm.add_argument("--output", default=None, metavar="FILE",
                       help="where to write the script (default: runs/<name>/job.sbatch)")
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
    count = rank_file(args.input, args.output, config, workers=args.workers)
    print(f"ranked {count} groups: {args.output}")
    return 0


def _apply_wandb_mode(config) -> None:
    """Make the process's ``WANDB_MODE`` say what the config decides: libraries read it at import
    (transformers announces "offline mode" whenever it is "offline", whatever the run's setting)."""
    from selfrank.launch.tracking import resolve_mode

    os.environ["WANDB_MODE"] = resolve_mode(config.tracking.wandb, quiet=True)


def _cmd_stage(args) -> int:
    from pathlib import Path

    from selfrank.launch.config import load_experiment
    from selfrank.launch.preflight import preflight
    from selfrank.launch.tracking import Tracker, pipeline_callbacks
    from selfrank.train import dist
    from selfrank.train.config import STAGES
    from selfrank.train.pipeline import run_pipeline
    from selfrank.train.signals import install_stop_handlers

    config = load_experiment(args.config, args.overrides)
    args.run_root = Path(config.output_dir) / config.name
    stages = list(STAGES) if args.command == "run" else [args.command]
    redo = args.force and args.command != "run"
    plans = preflight(config, stages, world=dist.world_size(), resume=args.resume, force=args.force, redo=redo)
    if args.dry_run:
        if dist.is_main():
            for plan in plans:
                print(plan.describe())
            print(f"checks passed; nothing was run (run folder: {args.run_root})")
        return 0
    _apply_wandb_mode(config)
    install_stop_handlers(interrupt=True)
    # W&B on the main process only (a no-op tracker elsewhere); the pipeline sees plain callbacks.
    with Tracker.open(config, args.run_root, resume=args.resume) as tracker:
        run_pipeline(config, stages=stages, resume=args.resume, force=args.force, redo=redo,
                     **pipeline_callbacks(tracker, config))
    if dist.is_main():
        _print_results(config, show_table="eval" in stages)
    return 0


def _print_results(config, show_table: bool) -> None:
    """The report's main table (when eval ran) and, as the last line, where the report is."""
    from selfrank.train.pipeline import report_path

    report = report_path(config)
    if not report.is_file():
        print(f"results: {report.parent.parent}")
        return
    if show_table:
        import json

        from selfrank.train.evaluation.report import format_table

        results = json.loads((report.parent / "report.json").read_text(encoding="utf-8"))
        print()
        print(format_table(results))
    print(f"report: {report}")


def _cmd_experiment(args) -> int:
    from selfrank.launch.experiment import load_grid, run_grid

    run_grid(load_grid(args.grid), force=args.force)
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
    # The per-file "Generating train split" bars of Parquet/CSV/hub data. Set for the import to come, not
    # by importing datasets here: most runs never load it, and it takes seconds to import.
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("httpx", "urllib3", "filelock", "datasets", "sentence_transformers", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def continue_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments with ``--resume``."""
    program = sys.argv[0] if os.path.basename(sys.argv[0]) == "selfrank" else "python -m selfrank"
    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return " ".join([program, shlex.join(args)])


def _stopped_message(exc, argv: list[str]) -> str:
    """One line for a run stopped by a signal at a step boundary (with a checkpoint)."""
    done = "" if exc.step is None else f" after {exc.step} steps"
    return (f"selfrank: {exc.stage} stopped by {exc.signal_name}{done}; progress saved in {exc.checkpoint}; "
            f"continue with: {continue_command(argv)}")


def _interrupted_message(args, argv: list[str]) -> str:
    """One line for a run interrupted at once (a second Ctrl-C): where it was, what is kept, how to go on."""
    from selfrank.train.progress import where

    position = where()
    stage = position.get("stage")
    if stage is None:
        return "selfrank: interrupted before any stage started; nothing to continue"
    text = f"selfrank: interrupted in {stage}"
    if "loop" in position:
        text += f" ({position['loop']} at {position['unit']} {position['done']}/{position['total']})"
    root = getattr(args, "run_root", None)
    if root is not None:
        from selfrank.train.rundir import unfinished_work

        kept = [f for folder in (root / stage, root / f"{stage}.new") for f in unfinished_work(folder)]
        text += (f"; kept: {'; '.join(kept)}" if kept
                 else f"; {stage} keeps no checkpoint yet, so it starts over (earlier stages are complete)")
    return f"{text}; continue with: {continue_command(argv)}"


def main(argv: list[str] | None = None) -> int:
    # Each selfrank process starts its own W&B service: one inherited from a parent process (which
    # wandb advertises through this variable) would outlive a killed run and keep its run id "in use",
    # so the resumed run could not reopen it.
    os.environ.pop("WANDB_SERVICE", None)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _quiet_libraries(args.verbose)
    handler = {"rank": _cmd_rank, "slurm": _cmd_slurm, "experiment": _cmd_experiment}.get(args.command, _cmd_stage)
    wandb_mode = os.environ.get("WANDB_MODE")
    try:
        return handler(args)
    except UserError as exc:
        print(f"selfrank: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted_message(args, argv), file=sys.stderr)
        return 130
    except Exception as exc:
        from selfrank.atomic import disk_full_errno
        from selfrank.train.signals import Preempted

        if isinstance(exc, Preempted):  # 143 after SIGTERM/SIGUSR1: the job script requeues the job, which resumes
            print(_stopped_message(exc, argv), file=sys.stderr)
            return exc.exit_code
        code = disk_full_errno(exc)
        if code is None:
            raise
        where = getattr(exc, "filename", None) or "the run folder"
        print(f"selfrank: error: disk full while writing {where} ({os.strerror(code)}); "
              "free space (or raise the file size limit) and rerun with --resume", file=sys.stderr)
        return 1
    finally:
        if wandb_mode is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = wandb_mode
        if "torch" in sys.modules:  # a stage ran (no need to import torch only to find no process group)
            from selfrank.train.dist import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
