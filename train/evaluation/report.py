"""The evaluation report: ``report.json`` (every number), ``report.md`` (the paper's tables) and plots.

``results`` is the dict ``train.evaluate.evaluate_rows`` returns; the keys read here are
``task_kind``, ``confidence``, ``n_examples``, ``rows`` (name -> ``{"metrics": {metric: {"mean", "low",
"high"}}, "corpus_bleu": float}``, in table order), ``paired_vs_sft``, ``agreement`` and ``curves``
(name -> ``{"step": [...], "reward/mean": [...], "objective/kl": [...]}``). Metric values are stored
in [0, 1] and shown x100 like the paper. Every file is written atomically.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from selfrank.atomic import atomic_open, write_json, write_text

from selfrank.train.evaluation.metrics import EXACT_ANSWER_TASKS, TEXT_METRICS

COLUMN_TITLES = {"bleu4": "BLEU-4", "gleu": "GLEU", "meteor": "METEOR", "em": "EM", "f1": "F1",
                 "precision": "Precision", "recall": "Recall"}
ROW_TITLES = {"original": "original", "sft": "SFT", "full": "full fine-tuning", "lora": "LoRA", "bitfit": "BitFit",
              "adapter": "Adapter", "str": "STR", "str_noise": "STR + noise", "str_listwise": "STR (listwise RM)",
              "str_online": "STR (online RM)"}
CURVE_KEYS = ("reward/mean", "objective/kl")


def row_title(name: str) -> str:
    if name.startswith("sft_"):  # baselines are named sft_<method>
        return ROW_TITLES.get(name[4:], name[4:])
    return ROW_TITLES.get(name, name)


def table_columns(task_kind: str) -> tuple[str, ...]:
    return TEXT_METRICS + (("em", "f1") if task_kind in EXACT_ANSWER_TASKS else ())


def _fmt(x: float | None, scale: float = 100.0) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.2f}"


def format_table(results: dict) -> str:
    """The main Markdown table: one row per system, "mean [low, high]" x100, best mean per column bold."""
    rows: dict = results["rows"]
    columns = table_columns(results.get("task_kind", ""))
    conf = results.get("confidence", 0.95)
    best = {}
    for col in columns:
        means = [r["metrics"][col]["mean"] for r in rows.values() if col in r["metrics"]]
        best[col] = max(means) if means else None
    header = ["system"] + [f"{COLUMN_TITLES[c]} (x100)" for c in columns] + ["corpus BLEU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [row_title(name)]
        for col in columns:
            m = row["metrics"].get(col)
            if m is None:
                cells.append("n/a")
                continue
            cell = f"{_fmt(m['mean'])} [{_fmt(m['low'])}, {_fmt(m['high'])}]"
            cells.append(f"**{cell}**" if best[col] is not None and math.isclose(m["mean"], best[col]) else cell)
        cells.append(_fmt(row.get("corpus_bleu"), 1.0))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    answers = (results.get("decoding") or {}).get("samples_per_prompt", 1)
    each = f" (each scored as the mean of its {answers} sampled answers)" if answers > 1 else ""
    lines.append(f"Means over {results.get('n_examples', '?')} test examples{each} with {int(conf * 100)}% "
                 "percentile bootstrap intervals over examples; best mean per column in bold. Corpus BLEU: "
                 "sacreBLEU (0-100).")
    return "\n".join(lines)


def format_paired(results: dict) -> str:
    paired = results.get("paired_vs_sft") or {}
    if not paired:
        return ""
    columns = [c for c in table_columns(results.get("task_kind", "")) if any(c in p for p in paired.values())]
    lines = ["| system - SFT | " + " | ".join(COLUMN_TITLES[c] for c in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for name, diffs in paired.items():
        cells = []
        for c in columns:
            d = diffs.get(c)
            cells.append("n/a" if d is None
                         else f"{d['diff'] * 100:+.2f} [{d['low'] * 100:+.2f}, {d['high'] * 100:+.2f}]")
        lines.append(f"| {row_title(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_agreement(agreement: dict | None) -> str:
    """Exact-order match and Kendall tau per scorer, on all answers and on ISODATA representatives."""
    if not agreement or not agreement.get("scorers"):
        return ""
    lines = ["| scorer | answers | groups | exact order match % [CI] | chance % | match % (no ref ties, n) "
             "| Kendall tau [CI] |", "|---|---|---|---|---|---|---|"]
    for name, per_filter in agreement["scorers"].items():
        for filt, s in per_filter.items():
            label = "all" if filt == "all" else "ISODATA representatives"
            if s["exact_match"] is None:
                lines.append(f"| {name} | {label} | 0 | n/a | n/a | n/a | n/a |")
                continue
            em = f"{s['exact_match'] * 100:.1f} [{s['exact_match_low'] * 100:.1f}, {s['exact_match_high'] * 100:.1f}]"
            strict = ("n/a" if s["exact_match_no_ref_ties"] is None
                      else f"{s['exact_match_no_ref_ties'] * 100:.1f} ({s['n_groups_no_ref_ties']})")
            tau = ("n/a" if s["kendall_tau"] is None
                   else f"{s['kendall_tau']:.3f} [{s['kendall_tau_low']:.3f}, {s['kendall_tau_high']:.3f}]")
            lines.append(f"| {name} | {label} | {s['n_groups']} | {em} | {s['chance'] * 100:.2f} | {strict} | {tau} |")
    return "\n".join(lines)


def curve_summary(curves: dict) -> dict:
    """First / last / min / max of reward and KL per PPO run."""
    out = {}
    for name, log in curves.items():
        entry = {"steps": len(log.get("step", []))}
        for key in CURVE_KEYS:
            values = [v for v in log.get(key, []) if v is not None and not math.isnan(v)]
            entry[key] = ({"first": values[0], "last": values[-1], "min": min(values), "max": max(values)}
                          if values else None)
        out[name] = entry
    return out


def format_curves(curves: dict) -> str:
    summary = curve_summary(curves)
    if not summary:
        return ""
    lines = ["| run | steps | reward first -> last (min, max) | KL first -> last (min, max) |", "|---|---|---|---|"]
    for name, s in summary.items():
        cells = []
        for key in CURVE_KEYS:
            v = s[key]
            cells.append("n/a" if v is None
                         else f"{v['first']:.3f} -> {v['last']:.3f} ({v['min']:.3f}, {v['max']:.3f})")
        lines.append(f"| {row_title(name)} | {s['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with atomic_open(path, "wb", encoding=None) as handle:
        handle.write(buffer.getvalue())


def plot_metrics(results: dict, path: Path) -> None:
    """Grouped bars (x100) with the bootstrap intervals as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = results["rows"]
    columns = table_columns(results.get("task_kind", ""))
    names = list(rows)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(columns) + 0.4 * len(names)), 4.0))
    x = np.arange(len(columns))
    for k, name in enumerate(names):
        ms = [rows[name]["metrics"].get(c) for c in columns]
        mean = np.array([m["mean"] * 100 if m else np.nan for m in ms])
        low = np.array([(m["mean"] - m["low"]) * 100 if m else 0.0 for m in ms])
        high = np.array([(m["high"] - m["mean"]) * 100 if m else 0.0 for m in ms])
        ax.bar(x + (k - (len(names) - 1) / 2) * width, mean, width, yerr=np.vstack([low, high]), capsize=3,
               label=row_title(name))
    ax.set_xticks(x)
    ax.set_xticklabels([COLUMN_TITLES[c] for c in columns])
    ax.set_ylabel("score x100")
    ax.legend(fontsize=8)
    ax.set_title(f"test metrics, {int(results.get('confidence', 0.95) * 100)}% bootstrap intervals")
    _save_figure(fig, path)
    plt.close(fig)


def plot_curves(curves: dict, key: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name, log in curves.items():
        pairs = [(s, v) for s, v in zip(log.get("step", []), log.get(key, [])) if v is not None]
        if pairs:
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], label=row_title(name))
    ax.set_xlabel("PPO step")
    ax.set_ylabel(key)
    ax.legend(fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)


def write_report(out_folder: str | Path, results: dict) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_folder``; returns their paths."""
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    curves = results.get("curves") or {}
    write_json(paths["json"], {**results, "curve_summary": curve_summary(curves)})
    if results.get("rows"):
        paths["metrics_png"] = out / "metrics.png"
        plot_metrics(results, paths["metrics_png"])
    if curves:
        paths["reward_png"] = out / "reward.png"
        paths["kl_png"] = out / "kl.png"
        plot_curves(curves, "reward/mean", paths["reward_png"])
        plot_curves(curves, "objective/kl", paths["kl_png"])
    sections = [f"# Evaluation ({results.get('task_kind', '?')})", "", format_table(results), ""]
    for title, body in (("Paired differences to SFT (x100, bootstrap over examples)", format_paired(results)),
                        ("Ranking agreement with the reference order (METEOR to the gold answers)",
                         format_agreement(results.get("agreement"))),
                        ("PPO reward and KL", format_curves(curves))):
        if body:
            sections += [f"## {title}", "", body, ""]
    decoding = results.get("decoding")
    if decoding:
        sections += ["Decoding: " + ", ".join(f"{k}={v}" for k, v in decoding.items()), ""]
    for key in ("metrics_png", "reward_png", "kl_png"):
        if key in paths:
            sections.append(f"![{key[:-4]}]({paths[key].name})")
    write_text(paths["md"], "\n".join(sections).rstrip() + "\n")
    return paths
