"""The evaluation report: ``report.json`` (every number), ``report.md`` (tables a reader can follow
without the paper) and plots.

``results`` is the dict ``train.evaluation.evaluate.evaluate_rows`` returns; the keys read here are
``task_kind``, ``confidence``, ``n_examples``, ``rows`` (name -> ``{"metrics": {metric: {"mean", "low",
"high"}}, "corpus_bleu": float}``, in table order), ``reference_tokens`` (``{"median": ...}``: the gold
answers' length), ``paired_vs_sft``, ``agreement`` and ``curves`` (name -> ``{"step": [...],
"reward/mean": [...], "objective/kl": [...], "objective/kl_k3": [...]}``). Metric values are stored in
[0, 1] and shown x100 like the paper. Every file is written atomically.

Choices made here, recorded:

* ``report.md`` opens with "How to read this report": what each row and column is, what the agreement
  study measures, and what a healthy PPO run looks like.
* Corpus BLEU is shown only when the gold answers are long enough for it: with a median under
  :data:`MIN_BLEU_TOKENS` tokens most answers have no 4-gram at all, so corpus BLEU is 0 for good and
  bad systems alike and jumps with the few longer answers (it read 0.00 for SFT and 28 for a rerun of
  the same task). The per-example BLEU-4 column (smoothed) and EM/F1 measure such answers instead.
* PPO's KL is named by its estimator: ``objective/kl`` is k1 (the summed per-token log pi - log
  pi_SFT of each answer, averaged), unbiased but negative on some batches; ``objective/kl_k3``
  (Schulman's k3) is never negative. Start and end values are means over the first and last tenth of
  the steps (single steps are noise), and the plots draw a moving average over the raw points.
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
              "str_online": "STR (online RM)", "str_direct": "STR (direct ranking, no RM)",
              "greedy": "SFT greedy (control)", "majority": "SFT majority vote (control)"}
ROW_HELP = {
    "original": "the policy before any training",
    "sft": "supervised fine-tuning on the task's training answers; every STR row starts from it",
    "full": "SFT of every weight",
    "lora": "SFT of low-rank adapters only (LoRA)",
    "bitfit": "SFT of the bias terms only (BitFit)",
    "adapter": "SFT of small bottleneck adapters only",
    "str": "SFT, then PPO against a reward model trained on STR's pairs: K sampled answers per prompt ranked "
           "by TextRank over their Sentence-BERT similarities, near-duplicates merged by ISODATA clustering",
    "str_noise": "as STR, with each pair's losing answer perturbed (the paper's \"+ noise\")",
    "str_listwise": "as STR, with the reward model trained on each whole ranked list (Plackett-Luce)",
    "str_online": "as STR, with the reward model refreshed from ranked PPO rollouts during PPO",
    "greedy": "control: the SFT model decoding greedily (its most likely answer, no sampling); an STR gain that "
              "this row matches may only mean PPO made sampling greedier",
    "majority": "control: self-consistency from the SFT model with no training beyond SFT: K answers sampled as "
                "STR samples its groups, and the most frequent after normalisation (ties: the one sharing the "
                "most words with the others); an STR gain that this row matches is what consensus gives "
                "without a reward model or PPO",
    "str_direct": "SFT, then PPO with no reward model: each prompt's PPO answers are ranked against each other "
                  "(TextRank over Sentence-BERT similarities) and an answer's reward is its centrality standardised "
                  "within its group (so its reward curve is 0 by construction)",
}
COLUMN_HELP = {
    "bleu4": "n-gram overlap with the gold answer, per example (smoothed, so a short answer is not 0 for "
             "lacking 4-grams)",
    "gleu": "Google-BLEU: the smaller of n-gram precision and recall",
    "meteor": "word matches with the gold answer, counting stems and WordNet synonyms, weighted to recall",
    "em": "exact match: the answer equals a gold answer after SQuAD normalisation (case, punctuation, "
          "articles)",
    "f1": "word overlap with the best gold answer",
}
CURVE_KEYS = ("reward/mean", "objective/kl", "objective/kl_k3")
CURVE_LABELS = {"reward/mean": "reward (normalised RM score; SFT samples: mean 0, std 1)",
                "objective/kl": "KL(policy || SFT), nats per answer (k1; dashed: k3)",
                "objective/kl_k3": "KL(policy || SFT), k3, nats per answer"}
# Corpus BLEU needs answers with 4-grams: below this median gold length (tokens) it is left out.
MIN_BLEU_TOKENS = 4


def row_title(name: str) -> str:
    if name.startswith("sft_rerank_"):  # best of K by a variant's reward model
        return f"SFT best of K by the {ROW_TITLES.get(name[11:], name[11:])} RM (control)"
    if name.startswith("sft_"):  # baselines are named sft_<method>
        return ROW_TITLES.get(name[4:], name[4:])
    if name.endswith("_greedy") and name[:-7] in ROW_TITLES:  # a trained row decoding greedily
        return f"{ROW_TITLES[name[:-7]]}, greedy"
    return ROW_TITLES.get(name, name)


def _row_help(name: str) -> str:
    if name.startswith("sft_rerank_"):
        return ("control: of the K answers the majority vote picks from, the one this variant's reward model scores "
                "highest; the reward signal without PPO (an STR gain below it: PPO did not get what the reward "
                "model knows into the policy)")
    base = name[4:] if name.startswith("sft_") else name
    if base.endswith("_greedy") and base[:-7] in ROW_HELP:
        return (f"the {row_title(base[:-7])} model decoding greedily, paired against SFT greedy (the table after "
                "the paired differences to SFT)")
    return ROW_HELP.get(base, "a model evaluated like the others")


def table_columns(task_kind: str) -> tuple[str, ...]:
    return TEXT_METRICS + (("em", "f1") if task_kind in EXACT_ANSWER_TASKS else ())


def _fmt(x: float | None, scale: float = 100.0) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.2f}"


def corpus_bleu_note(results: dict) -> str | None:
    """None when corpus BLEU belongs in the table; else the sentence saying why it is left out."""
    median = (results.get("reference_tokens") or {}).get("median")
    if median is None or median >= MIN_BLEU_TOKENS:
        return None
    return (f"Corpus BLEU is left out: the gold answers have a median of {median:g} tokens, fewer than BLEU's "
            "4-grams, so it is 0 for most systems and swings with the few longer answers; EM and F1 measure "
            "short answers (report.json keeps the corpus BLEU values).")


def format_table(results: dict) -> str:
    """The main Markdown table: one row per system, "mean [low, high]" x100, best mean per column bold."""
    rows: dict = results["rows"]
    columns = table_columns(results.get("task_kind", ""))
    conf = results.get("confidence", 0.95)
    with_bleu = corpus_bleu_note(results) is None
    best = {}
    for col in columns:
        means = [r["metrics"][col]["mean"] for r in rows.values() if col in r["metrics"]]
        best[col] = max(means) if means else None
    header = ["system"] + [f"{COLUMN_TITLES[c]} (x100)" for c in columns] + (["corpus BLEU"] if with_bleu else [])
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
        if with_bleu:
            cells.append(_fmt(row.get("corpus_bleu"), 1.0))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    answers = (results.get("decoding") or {}).get("samples_per_prompt", 1)
    each = f" (each scored as the mean of its {answers} sampled answers)" if answers > 1 else ""
    bleu = " Corpus BLEU: sacreBLEU (0-100)." if with_bleu else " " + corpus_bleu_note(results)
    lines.append(f"Means over {results.get('n_examples', '?')} test examples{each} with {int(conf * 100)}% "
                 f"percentile bootstrap intervals over examples; best mean per column in bold.{bleu}")
    return "\n".join(lines)


def how_to_read(results: dict) -> str:
    """What each row and column is, and how to read the other sections, in plain words."""
    conf = int(results.get("confidence", 0.95) * 100)
    lines = ["**Systems** (rows):"]
    for name in results.get("rows", {}):
        lines.append(f"- {row_title(name)}: {_row_help(name)}.")
    lines += ["", f"**Columns**: each cell is the mean over the test examples, x100, with its {conf}% bootstrap "
                  "interval [low, high]:"]
    for col in table_columns(results.get("task_kind", "")):
        lines.append(f"- {COLUMN_TITLES[col]}: {COLUMN_HELP.get(col, '')}.")
    lines += ["", "Two systems differ reliably when their paired difference (the next table: system minus SFT "
                  "on the same examples) has an interval that excludes 0; overlapping intervals in the main "
                  "table do not show that they are equal."]
    if results.get("agreement"):
        lines += ["", "**Ranking agreement**: how often a scorer (TextRank, or a trained reward model) orders a "
                      "group of sampled answers exactly as their METEOR to the gold answer does (ties in that "
                      "reference may go either way). \"ISODATA representatives\": the same on one answer per "
                      "ISODATA cluster (near-duplicates merged), the answers STR trains on. \"chance %\": the "
                      "match rate of a random order. \"no ref ties\": only the groups whose reference scores "
                      "have no ties, with their count n. Kendall tau: rank correlation with the reference "
                      "(1 = same order, 0 = unrelated)."]
    if results.get("curves"):
        lines += ["", "**PPO**: reward is the reward model's score of the policy's answers, normalised so that the "
                      "SFT model's own samples score mean 0 and std 1 (above 0: the reward model prefers the "
                      "policy to SFT). KL measures how far the policy has moved from SFT, in nats per answer: "
                      "k1 = log pi - log pi_SFT summed over the answer's tokens (unbiased, but a batch can come "
                      "out negative when the policy happens to sample tokens SFT likes more), k3 (never "
                      "negative, smoother). A healthy run: the smoothed reward rises and levels off while KL "
                      "starts near 0 and grows slowly to a few nats. KL climbing steeply while the reward falls "
                      "means the policy moves faster than the reward model can guide it (lower ppo.lr or raise "
                      "ppo.kl_coef); a reward that falls while EM rises means the reward model and the task "
                      "metric disagree (its held-out accuracy is in reward/<variant>/DONE.json)."]
    return "\n".join(lines)


def format_paired(results: dict, key: str = "paired_vs_sft", baseline: str = "SFT") -> str:
    paired = results.get(key) or {}
    if not paired:
        return ""
    columns = [c for c in table_columns(results.get("task_kind", "")) if any(c in p for p in paired.values())]
    lines = [f"| system - {baseline} | " + " | ".join(COLUMN_TITLES[c] for c in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for name, diffs in paired.items():
        cells = []
        for c in columns:
            d = diffs.get(c)
            cells.append("n/a" if d is None
                         else f"{d['diff'] * 100:+.2f} [{d['low'] * 100:+.2f}, {d['high'] * 100:+.2f}]")
        lines.append(f"| {row_title(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def format_stage_times(results: dict) -> str:
    """One line: each stage's wall time (a resumed stage: its last run), as the run recorded it."""
    times = results.get("stage_seconds") or {}
    if not times:
        return ""
    parts = [f"{stage} {_duration(seconds)}" for stage, seconds in times.items()]
    return (" · ".join(parts) + f" (total {_duration(sum(times.values()))}; eval up to this report; a resumed "
            "stage counts its last run only)")


def format_sft_learning_rates(results: dict) -> str:
    """One line per SFT method: the learning rate it trained at and, after ``sft.lr_search``, every
    candidate's validation loss."""
    rates = results.get("sft_learning_rates") or {}
    lines = []
    for method, entry in rates.items():
        line = f"- {ROW_TITLES.get(method, method)}: {entry['lr']:g}"
        if entry.get("search"):
            tried = ", ".join(f"{t['lr']:g} -> " + ("diverged" if t.get("validation_loss") is None
                                                     else f"{t['validation_loss']:.4f}") for t in entry["search"])
            line += f" (lowest validation loss of {tried})"
        lines.append(line)
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


def _tenth_mean(values: list[float], last: bool) -> float:
    count = max(1, len(values) // 10)
    part = values[-count:] if last else values[:count]
    return sum(part) / len(part)


def curve_summary(curves: dict) -> dict:
    """Per PPO run and curve: ``start`` / ``end`` (means over the first / last tenth of the steps),
    ``first`` / ``last`` step values, ``min`` / ``max``."""
    out = {}
    for name, log in curves.items():
        entry = {"steps": len(log.get("step", []))}
        for key in CURVE_KEYS:
            values = [v for v in log.get(key, []) if v is not None and not math.isnan(v)]
            entry[key] = ({"first": values[0], "last": values[-1], "min": min(values), "max": max(values),
                           "start": _tenth_mean(values, last=False), "end": _tenth_mean(values, last=True)}
                          if values else None)
        out[name] = entry
    return out


def format_curves(curves: dict) -> str:
    summary = curve_summary(curves)
    if not summary:
        return ""
    keys = [key for key in CURVE_KEYS if any(s.get(key) for s in summary.values())]
    titles = {"reward/mean": "reward", "objective/kl": "KL k1", "objective/kl_k3": "KL k3"}
    lines = ["| run | steps | " + " | ".join(f"{titles[k]}: start -> end (min, max)" for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for name, s in summary.items():
        cells = []
        for key in keys:
            v = s[key]
            cells.append("n/a" if v is None
                         else f"{v['start']:.3f} -> {v['end']:.3f} ({v['min']:.3f}, {v['max']:.3f})")
        lines.append(f"| {row_title(name)} | {s['steps']} | " + " | ".join(cells) + " |")
    lines += ["", "start / end: means over the first / last tenth of the steps (a single step is noisy); "
                  "min / max over single steps."]
    return "\n".join(lines)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


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


def plot_curves(curves: dict, key: str, path: Path, extra: str | None = None) -> None:
    """One PPO curve per run: the raw per-step values faint, a moving average (a tenth of the steps)
    over them; ``extra`` (e.g. the k3 KL) drawn dashed, smoothed only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, log) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        for curve, dashed in ((key, False), (extra, True)):
            if curve is None:
                continue
            pairs = [(s, v) for s, v in zip(log.get("step", []), log.get(curve, [])) if v is not None]
            if not pairs:
                continue
            steps, values = [p[0] for p in pairs], [p[1] for p in pairs]
            window = max(1, len(values) // 10)
            label = f"{row_title(name)}{' (k3)' if dashed else ''}, mean of {window} steps"
            if extra is not None and not dashed:
                label = label.replace(", mean", " (k1), mean")
            if not dashed:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, window), color=color, linewidth=1.8,
                    linestyle="--" if dashed else "-", label=label)
    if key.startswith("objective/kl"):
        ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xlabel("PPO step")
    ax.set_ylabel(CURVE_LABELS.get(key, key), fontsize=8)
    ax.set_title("faint: each step; solid: moving average", fontsize=9)
    ax.legend(fontsize=7)
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
        has_k3 = any(v is not None for log in curves.values() for v in log.get("objective/kl_k3", []))
        plot_curves(curves, "objective/kl", paths["kl_png"], extra="objective/kl_k3" if has_k3 else None)
    sections = [f"# Evaluation ({results.get('task_kind', '?')})", "", "## How to read this report", "",
                how_to_read(results), "", "## Results", "", format_table(results), ""]
    for title, body in (("Paired differences to SFT (x100, bootstrap over examples)", format_paired(results)),
                        ("Decoding greedily: paired differences to SFT greedy (x100)",
                         format_paired(results, "paired_vs_sft_greedy", "SFT greedy")),
                        ("Ranking agreement with the reference order (METEOR to the gold answers)",
                         format_agreement(results.get("agreement"))),
                        ("PPO reward and KL", format_curves(curves)),
                        ("SFT learning rates", format_sft_learning_rates(results)),
                        ("Wall time per stage", format_stage_times(results))):
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
