"""`selfrank experiment GRID.yaml`: tasks x seeds, every method of each run, one results table.

Each (task, seed) is one ordinary pipeline run (`runs/<grid>/<task>-s<seed>/`), whose eval stage already
scores every row (original, SFT, baselines, STR variants) on the same test examples. Completed stages are
reused, so rerunning the grid only does what is missing. The grid then pools the per-example scores over
seeds, bootstraps a CI per cell, prints the paper's layout (mean and 95% CI per cell, best per column
bold), the ranking-agreement study, and a cost ledger, and writes `results.md`, `results.json`,
`results.png` and (optionally) `docs/RESULTS.md`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selfrank.atomic import write_json, write_text
from selfrank.errors import UserError
from selfrank.jsonl import read_jsonl
from selfrank.validate import check_range

log = logging.getLogger(__name__)


@dataclass
class AnnotationCost:
    # What the same comparisons would cost from crowd annotators (the paper's point).
    price_per_comparison: float = 0.10
    annotators_per_comparison: int = 3  # the paper's human check used 3 annotators
    currency: str = "USD"

    def __post_init__(self):
        check_range("annotation.price_per_comparison", self.price_per_comparison, 0.0)
        check_range("annotation.annotators_per_comparison", self.annotators_per_comparison, 1)


@dataclass
class AgreementSweepConfig:
    # TextRank's agreement with the gold-based order per group size and embedder (train.agreement_sweep),
    # on the first seed's SFT model of each named task (experiment YAML stems; empty: no sweep).
    tasks: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=lambda: [4, 8, 16])
    embedders: list[str] = field(default_factory=lambda: ["all-MiniLM-L6-v2", "lexical"])

    def __post_init__(self):
        if not self.sizes or any(not isinstance(k, int) or isinstance(k, bool) or k < 2 for k in self.sizes):
            raise UserError(f"agreement_sweep.sizes: group sizes must be integers >= 2, got {self.sizes}")
        if not self.embedders or any(not isinstance(e, str) or not e.strip() for e in self.embedders):
            raise UserError(f"agreement_sweep.embedders: name at least one embedder, got {self.embedders}")


@dataclass
class GridConfig:
    name: str = "grid"
    tasks: list[str] = field(default_factory=list)  # experiment YAMLs
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE applied to every run
    output_dir: str = "runs"
    results_doc: str | None = None  # e.g. docs/RESULTS.md
    command: str = ""  # the command that regenerates this grid, quoted in the results document
    annotation: AnnotationCost = field(default_factory=AnnotationCost)
    agreement_sweep: AgreementSweepConfig = field(default_factory=AgreementSweepConfig)
    # A reading of the results in plain words, kept with the grid so that a regenerated document keeps it.
    notes: str = ""
    bootstrap: int = 1000
    confidence: float = 0.95

    def __post_init__(self):
        if not self.tasks:
            raise UserError("tasks: name at least one experiment YAML")
        if not self.seeds:
            raise UserError("seeds: name at least one seed")
        check_range("bootstrap", self.bootstrap, 10)
        check_range("confidence", self.confidence, 0.5, 1.0, high_open=True)
        stems = [Path(t).stem for t in self.tasks]
        unknown = [t for t in self.agreement_sweep.tasks if t not in stems]
        if unknown:
            raise UserError(f"agreement_sweep.tasks: {unknown} are not among the grid's tasks {stems}")


def _per_example(eval_dir: Path, row: str, metric: str) -> np.ndarray:
    return np.array([r[metric] for _, r in read_jsonl(eval_dir / f"generations_{row}.jsonl")], dtype=np.float64)


def pool_task(run_dirs: list[Path], grid: GridConfig) -> dict:
    """One task's rows pooled over seeds: per cell the mean over seeds x examples and its bootstrap CI,
    plus each row's paired difference to SFT (examples resampled, seeds averaged per example)."""
    from selfrank.train.evaluation.controls import paired_sets
    from selfrank.train.evaluation.metrics import bootstrap_ci, paired_bootstrap_diff

    reports = [json.loads((d / "eval" / "report.json").read_text()) for d in run_dirs]
    first = reports[0]
    rows = [name for name in first["rows"] if all(name in r["rows"] for r in reports)]
    metrics = first["metrics"]
    per_row: dict[str, dict[str, np.ndarray]] = {}
    for row in rows:
        # (seeds, examples) -> mean over seeds per example, so that examples stay the resampling unit.
        per_row[row] = {m: np.mean([_per_example(d / "eval", row, m) for d in run_dirs], axis=0) for m in metrics}
    pooled = {"task_kind": first["task_kind"], "confidence": grid.confidence, "n_examples": first["n_examples"],
              "seeds": len(run_dirs), "metrics": metrics, "rows": {}, "paired_vs_sft": {}}
    for row in rows:
        cells = {}
        for m in metrics:
            mean, low, high = bootstrap_ci(per_row[row][m], grid.bootstrap, grid.confidence, seed=0)
            cells[m] = {"mean": mean, "low": low, "high": high}
        corpus = [r["rows"][row].get("corpus_bleu") for r in reports]
        pooled["rows"][row] = {"metrics": cells, "corpus_bleu": float(np.mean([c for c in corpus if c is not None]))
                               if any(c is not None for c in corpus) else None}
    pooled.update(paired_sets(rows, per_row.__getitem__, lambda a, b: {
        m: paired_bootstrap_diff(a[m], b[m], grid.bootstrap, grid.confidence, 0) for m in metrics}))
    pooled["agreement"] = [r.get("agreement") for r in reports]
    return pooled


def cost_ledger(run_dir: Path, annotation: AnnotationCost) -> dict:
    """Ranking work done and compute spent by one run, against the crowd price of the same pairs."""
    from selfrank.train.rundir import RunDir

    run = RunDir(run_dir)
    sample = run.summary("sample")
    stages = {}
    for stage in ("sft", "sample", "reward", "ppo", "eval"):
        if run.is_done(stage):
            summary = run.summary(stage)
            processes = int(summary.get("processes", 1))
            stages[stage] = {"seconds": summary.get("stage_seconds", 0.0),
                             "process_seconds": summary.get("stage_seconds", 0.0) * processes,
                             "gpu_hours": summary.get("gpu_hours", 0.0)}
    pairs = int(sample.get("pairs", 0))
    crowd = pairs * annotation.annotators_per_comparison * annotation.price_per_comparison
    return {"pairs": pairs, "samples": sample.get("samples"), "stages": stages,
            "process_seconds": sum(s["process_seconds"] for s in stages.values()),
            "gpu_hours": sum(s["gpu_hours"] for s in stages.values()),
            "crowd_cost": crowd, "currency": annotation.currency,
            "annotators_per_comparison": annotation.annotators_per_comparison,
            "price_per_comparison": annotation.price_per_comparison}


def _mean_of(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _agreement_lines(agreements: list[dict | None]) -> list[str]:
    """Exact-order match and Kendall tau per scorer and filter, averaged over the seeds' studies."""
    present = [a for a in agreements if a]
    if not present:
        return ["(no ranking-agreement study in these runs)"]
    pct = lambda v: "n/a" if v is None else f"{v * 100:.1f}%"  # noqa: E731
    lines = ["| scorer | answers | exact-order match | chance | Kendall tau | groups |", "|---|---|---|---|---|---|"]
    for scorer, filters in present[0].get("scorers", {}).items():
        for filt in filters:
            cells = [a["scorers"][scorer][filt] for a in present if scorer in a.get("scorers", {})]
            tau = _mean_of([c.get("kendall_tau") for c in cells])
            lines.append(f"| {scorer} | {'ISODATA representatives' if filt == 'isodata' else 'all'} | "
                         f"{pct(_mean_of([c.get('exact_match') for c in cells]))} | "
                         f"{pct(_mean_of([c.get('chance') for c in cells]))} | "
                         f"{'n/a' if tau is None else f'{tau:.3f}'} | {sum(int(c.get('n_groups', 0)) for c in cells)} |")
    return lines


def _direction(d: dict) -> str:
    """A paired difference's CI read against 0: "better", "worse" or "no difference"."""
    return "better" if d["low"] > 0 else "worse" if d["high"] < 0 else "no difference"


def _diff_ci(d: dict) -> str:
    return f"{d['diff'] * 100:+.2f} [{d['low'] * 100:+.2f}, {d['high'] * 100:+.2f}]"


_VERDICT_WORDS = {"better": "better than SFT (CI above 0)", "worse": "worse than SFT (CI below 0)",
                  "no difference": "not distinguishable from SFT (CI spans 0)"}


def _verdicts(pooled: dict) -> list[str]:
    """Plain-words reading of each STR row against SFT (full fine-tuning), from the paired CIs."""
    return [f"- {row} {metric}: {_diff_ci(d)} x100 -> {_VERDICT_WORDS[_direction(d)]}"
            for row, diffs in pooled["paired_vs_sft"].items() if row.startswith("str")
            for metric, d in diffs.items()] + [
        f"- {row} {metric} (greedy, vs SFT greedy): {_diff_ci(d)} x100 -> {_VERDICT_WORDS[_direction(d)]}"
        for row, diffs in (pooled.get("paired_vs_sft_greedy") or {}).items() for metric, d in diffs.items()]


def environment() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "date": time.strftime("%Y-%m-%d")}


def _summary_lines(tasks: dict[str, dict], sweeps: dict[str, dict]) -> list[str]:
    """One line per task: each STR variant and each control row against SFT on the task's main metric,
    and TextRank's top pick against a random pick (from the sweep's default cell), from the CIs below."""
    from selfrank.train.evaluation.metrics import EXACT_ANSWER_TASKS

    lines = ["## Summary", ""]
    for task, pooled in tasks.items():
        metric = "em" if pooled["task_kind"] in EXACT_ANSWER_TASKS else "meteor"
        verdicts = []
        for row, diffs in pooled["paired_vs_sft"].items():
            if row.startswith("str") and metric in diffs:
                verdicts.append(f"{row} {_diff_ci(diffs[metric])} ({_direction(diffs[metric])})")
        line = f"- **{task}** ({metric} x100 vs SFT): " + ("; ".join(verdicts) or "no STR rows")
        controls = [f"{row[4:]} {_diff_ci(diffs[metric])}" for row, diffs in pooled["paired_vs_sft"].items()
                    if (row in ("sft_greedy", "sft_majority") or row.startswith("sft_rerank_")) and metric in diffs]
        if controls:  # what SFT reaches by decoding alone, beside STR's gain
            line += "; controls: SFT " + ", SFT ".join(controls)
        greedy = [f"{row} {_diff_ci(diffs[metric])}" for row, diffs in
                  (pooled.get("paired_vs_sft_greedy") or {}).items() if metric in diffs]
        if greedy:  # the same comparison at equal (greedy) decoding
            line += "; decoding greedily, vs SFT greedy: " + "; ".join(greedy)
        cells = (sweeps.get(task) or {}).get("cells") or []
        if cells:
            cell = max((c for c in cells if c["embedder"] == cells[0]["embedder"]), key=lambda c: c["k"])
            gain = cell["top_minus_random"]
            line += (f". TextRank's top answer vs a random one ({cell['embedder']}, K={cell['k']}): METEOR "
                     f"{gain['mean'] * 100:+.2f} [{gain['low'] * 100:+.2f}, {gain['high'] * 100:+.2f}]")
        lines.append(line + ".")
    return lines + [""]


def render(grid: GridConfig, tasks: dict[str, dict], ledgers: dict[str, list[dict]], env: dict,
           sweeps: dict[str, dict] | None = None) -> str:
    from selfrank.train.evaluation.report import format_table

    out = [f"# Results: {grid.name}", ""]
    if grid.command:
        out += ["Regenerate with:", "", "```bash", grid.command, "```", ""]
    out += [f"Environment: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}; "
            f"{env['cpu']} x {env['cores']} cores; GPU: {env['gpu'] or 'none'}; {env['date']}.", "",
            f"Seeds: {grid.seeds}. Each cell: mean over seeds and test examples, {int(grid.confidence * 100)}% "
            f"bootstrap CI over examples ({grid.bootstrap} resamples); metrics x100; best per column in bold. "
            "Every cell of the grid is shown.", ""]
    out += _summary_lines(tasks, sweeps or {})
    if grid.notes.strip():
        out += ["## Reading the results", "", grid.notes.strip(), ""]
    for task, pooled in tasks.items():
        out += [f"## {task}", "", format_table(pooled), "", "STR variants against SFT (paired bootstrap):", ""]
        out += _verdicts(pooled) or ["(no STR rows)"]
        out += ["", "Ranking agreement (answers ordered by the learned reward / TextRank vs by METEOR to the gold "
                "answer; mean over seeds):", ""]
        out += _agreement_lines(pooled["agreement"])
        if (sweeps or {}).get(task):
            out += ["", f"Agreement sweep: TextRank by group size K and embedder ({sweeps[task]['n_groups']} prompts, "
                    "K answers each from the SFT model; METEOR x100 of the answer TextRank puts first, of a random "
                    "answer (group mean) and of the group's best; 95% bootstrap CIs):", ""]
            out += _sweep_lines(sweeps[task])
        out += ["", "Cost ledger (per run):", "", "| run | pairs | process-seconds | GPU-hours | crowd cost |",
                "|---|---|---|---|---|"]
        for ledger in ledgers[task]:
            out.append(f"| {ledger['run']} | {ledger['pairs']} | {ledger['process_seconds']:.0f} | "
                       f"{ledger['gpu_hours']:.3f} | {ledger['crowd_cost']:.2f} {ledger['currency']} "
                       f"({ledger['annotators_per_comparison']} x {ledger['price_per_comparison']:.2f} per pair) |")
        out.append("")
    return "\n".join(out) + "\n"


def _plot(tasks: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfrank.atomic import atomic_open
    from selfrank.train.evaluation.metrics import EXACT_ANSWER_TASKS

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
    for ax, (task, pooled) in zip(axes[0], tasks.items()):
        metric = "em" if pooled["task_kind"] in EXACT_ANSWER_TASKS else "meteor"
        names = list(pooled["rows"])
        cells = [pooled["rows"][n]["metrics"][metric] for n in names]
        means = np.array([c["mean"] for c in cells]) * 100
        err = np.array([[c["mean"] - c["low"], c["high"] - c["mean"]] for c in cells]).T * 100
        ax.bar(range(len(names)), means, yerr=err, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(f"{task}: {metric} x100")
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


def run_sweep(config, sweep: AgreementSweepConfig, run_dir: Path) -> dict:
    """The agreement sweep of one run, computed once and kept in the run folder; redone when the
    sweep or the run's settings (the same digest that decides whether a stage is redone) change."""
    from selfrank.train.evaluation.agreement_sweep import agreement_sweep
    from selfrank.train.data.tasks import load_prompted_task
    from selfrank.train.pipeline import same_settings, settings_digest
    from selfrank.train.rundir import RunDir

    path = run_dir / "agreement_sweep.json"
    digest = settings_digest(config, "eval")  # everything the SFT model and the study's sampling depend on
    if path.is_file():
        kept = json.loads(path.read_text())
        # Made for this run's finished eval stage, which is still current (settings added to selfrank since,
        # at their defaults, change nothing: train.pipeline.same_settings)?
        done = RunDir(run_dir).summary("eval") if RunDir(run_dir).is_done("eval") else {}
        current = kept.get("settings_digest") == digest or (
            kept.get("settings_digest") == done.get("settings_digest")
            and same_settings("eval", done.get("settings"), done.get("settings_digest"), config))
        if kept.get("sizes") == sorted(sweep.sizes) and kept.get("embedders") == list(sweep.embedders) and current:
            return kept
    sft_model = run_dir / "sft" / "model"
    result = agreement_sweep(config, sft_model, load_prompted_task(config, sft_model).test, config.task.kind,
                             sizes=sweep.sizes, embedders=sweep.embedders)
    result["settings_digest"] = digest
    write_json(path, result)
    return result


def _sweep_lines(sweep: dict) -> list[str]:
    pct = lambda v: "n/a" if v is None else f"{v * 100:.1f}%"  # noqa: E731
    ci = lambda c: f"{c['mean'] * 100:.1f} [{c['low'] * 100:.1f}, {c['high'] * 100:.1f}]"  # noqa: E731
    lines = ["| embedder | K | clusters | exact order (chance) | Kendall tau | top pick | random pick | best pick | "
             "top - random |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in sweep.get("cells", []):
        every = cell["textrank"]["all"]
        tau = every.get("kendall_tau")
        lines.append(f"| {cell['embedder']} | {cell['k']} | {cell['mean_clusters']:.1f} | "
                     f"{pct(every.get('exact_match'))} ({pct(every.get('chance'))}) | "
                     f"{'n/a' if tau is None else f'{tau:.3f}'} | {ci(cell['top_pick'])} | {ci(cell['random_pick'])} | "
                     f"{ci(cell['best_pick'])} | {ci(cell['top_minus_random'])} |")
    return lines


def run_grid(grid: GridConfig, force: bool = False) -> dict:
    """Run (resume) every run of the grid, then pool them. Every run's config is loaded and checked
    (``launch.preflight``) before any work starts; ``force`` as for ``selfrank run``."""
    from selfrank.train import dist
    from selfrank.train.config import STAGES
    from selfrank.train.pipeline import run_pipeline

    from selfrank.launch.config import load_experiment
    from selfrank.launch.preflight import preflight

    root = Path(grid.output_dir) / grid.name
    configs = {}
    for task_path in grid.tasks:  # validate every run's config before any work starts
        for seed in grid.seeds:
            task_name = Path(task_path).stem
            configs[(task_name, seed)] = load_experiment(
                task_path, [*grid.overrides, f"seed={seed}", f"name={task_name}-s{seed}", f"output_dir={root}"])
    for config in configs.values():
        preflight(config, list(STAGES), world=dist.world_size(), resume=True, force=force)
    sweeps = {}
    for (task_name, seed), config in configs.items():
        log.info("grid %s: %s seed %d", grid.name, task_name, seed)
        run_pipeline(config, resume=True, force=force)
        if task_name in grid.agreement_sweep.tasks and seed == grid.seeds[0]:
            sweeps[task_name] = run_sweep(config, grid.agreement_sweep, root / f"{task_name}-s{seed}")
    tasks, ledgers = {}, {}
    for task_name in dict.fromkeys(t for t, _ in configs):
        dirs = [root / f"{task_name}-s{seed}" for seed in grid.seeds]
        tasks[task_name] = pool_task(dirs, grid)
        ledgers[task_name] = [{"run": d.name, **cost_ledger(d, grid.annotation)} for d in dirs]
    env = environment()
    results = {"grid": dataclasses.asdict(grid), "environment": env, "tasks": tasks, "ledgers": ledgers,
               "agreement_sweeps": sweeps}
    write_json(root / "results.json", results)
    text = render(grid, tasks, ledgers, env, sweeps)
    write_text(root / "results.md", text)
    _plot(tasks, root / "results.png")
    if grid.results_doc:
        write_text(grid.results_doc, text)
    print(text)
    return results


def load_grid(path: str | os.PathLike) -> GridConfig:
    from selfrank.launch.config import build, load_yaml

    return build(GridConfig, load_yaml(path))
