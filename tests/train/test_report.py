"""report.json / report.md / PNG plots from a hand-built results dict."""
from __future__ import annotations

import json

import pytest

from selfrank.train.evaluation.report import (MIN_BLEU_TOKENS, curve_summary, format_agreement, format_curves,
                                              format_table, how_to_read, moving_average, write_report)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _m(mean, half=0.01):
    return {"mean": mean, "low": mean - half, "high": mean + half}


def _results(task_kind="qa"):
    rows = {
        "original": {"metrics": {"bleu4": _m(0.01), "gleu": _m(0.02), "meteor": _m(0.06), "em": _m(0.10),
                                 "f1": _m(0.12)}, "corpus_bleu": 1.5},
        "sft": {"metrics": {"bleu4": _m(0.02), "gleu": _m(0.05), "meteor": _m(0.10), "em": _m(0.52),
                            "f1": _m(0.55)}, "corpus_bleu": 3.0},
        "lora": {"metrics": {"bleu4": _m(0.021), "gleu": _m(0.049), "meteor": _m(0.11), "em": _m(0.544),
                             "f1": _m(0.56)}, "corpus_bleu": 3.1},
        "str_noise": {"metrics": {"bleu4": _m(0.024), "gleu": _m(0.049), "meteor": _m(0.1077), "em": _m(0.568),
                                  "f1": _m(0.60)}, "corpus_bleu": 3.4},
    }
    if task_kind != "qa":
        for row in rows.values():
            for key in ("em", "f1"):
                row["metrics"].pop(key)
    return {
        "task_kind": task_kind, "n_examples": 50, "confidence": 0.95, "rows": rows,
        "paired_vs_sft": {"str_noise": {"bleu4": {"diff": 0.004, "low": 0.001, "high": 0.007, "p_not_better": 0.01}}},
        "agreement": {"n_groups": 10, "scorers": {"reward:str": {
            "all": {"n_groups": 10, "mean_group_size": 4.0, "exact_match": 0.3, "exact_match_low": 0.1,
                    "exact_match_high": 0.6, "chance": 0.05, "n_groups_no_ref_ties": 7,
                    "exact_match_no_ref_ties": 0.2857, "n_tau": 10, "kendall_tau": 0.41, "kendall_tau_low": 0.2,
                    "kendall_tau_high": 0.6, "skipped": 0},
            "isodata": {"n_groups": 0, "mean_group_size": None, "exact_match": None, "exact_match_low": None,
                        "exact_match_high": None, "chance": None, "n_groups_no_ref_ties": 0,
                        "exact_match_no_ref_ties": None, "n_tau": 0, "kendall_tau": None, "kendall_tau_low": None,
                        "kendall_tau_high": None, "skipped": 10}}}},
        "curves": {"str_noise": {"step": [0, 1, 2], "reward/mean": [-0.5, 0.1, 0.4], "objective/kl": [0.0, 0.2, None]}},
    }


def _row_line(table: str, title: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == title:
            return cells
    raise AssertionError(f"no row {title!r} in\n{table}")


def test_format_table_layout_and_bold_best():
    table = format_table(_results())
    header = table.splitlines()[0]
    for title in ("BLEU-4 (x100)", "GLEU (x100)", "METEOR (x100)", "EM (x100)", "F1 (x100)"):
        assert title in header
    # rows in the given order, with the paper's names
    order = [line.split("|")[1].strip() for line in table.splitlines()[2:6]]
    assert order == ["original", "SFT", "LoRA", "STR + noise"]
    noise = _row_line(table, "STR + noise")
    assert noise[1] == "**2.40 [1.40, 3.40]**"  # best BLEU-4
    assert noise[3] == "10.77 [9.77, 11.77]"  # METEOR best is LoRA's 11.00
    assert _row_line(table, "LoRA")[3] == "**11.00 [10.00, 12.00]**"
    assert _row_line(table, "SFT")[2] == "**5.00 [4.00, 6.00]**"
    assert _row_line(table, "original")[1] == "1.00 [0.00, 2.00]"
    assert table.count("**") == 2 * 5  # exactly one bold cell per metric column


def test_format_table_dialogue_has_no_qa_columns():
    table = format_table(_results("dialogue"))
    assert "EM" not in table and "METEOR (x100)" in table


def test_format_agreement_lists_filters():
    text = format_agreement(_results()["agreement"])
    assert "30.0 [10.0, 60.0]" in text and "5.00" in text and "0.410 [0.200, 0.600]" in text
    assert "ISODATA representatives | 0 | n/a" in text


def test_write_report_files(tmp_path):
    results = _results()
    paths = write_report(tmp_path / "eval", results)
    data = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert data["rows"]["sft"]["metrics"]["em"]["mean"] == pytest.approx(0.52)
    assert data["curve_summary"]["str_noise"]["reward/mean"] == {"first": -0.5, "last": 0.4, "min": -0.5, "max": 0.4,
                                                                "start": -0.5, "end": 0.4}
    assert data["curve_summary"]["str_noise"]["objective/kl"]["last"] == pytest.approx(0.2)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert format_table(results) in md
    assert "**2.40 [1.40, 3.40]**" in md
    assert "Ranking agreement" in md and "PPO reward and KL" in md and "+0.40 [+0.10, +0.70]" in md
    for key in ("metrics_png", "reward_png", "kl_png"):
        blob = paths[key].read_bytes()
        assert blob[:8] == PNG_SIGNATURE and len(blob) > 2000
        assert f"]({paths[key].name})" in md
    leftovers = [p.name for p in (tmp_path / "eval").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_write_report_without_curves_or_agreement(tmp_path):
    results = _results("dialogue")
    results.update(curves={}, agreement=None, paired_vs_sft={})
    paths = write_report(tmp_path, results)
    assert set(paths) == {"json", "md", "metrics_png"}
    md = paths["md"].read_text()
    assert "Ranking agreement" not in md and "PPO reward" not in md


def test_how_to_read_names_every_row_column_and_section():
    results = _results()
    text = how_to_read(results)
    for title in ("original", "SFT", "LoRA", "STR + noise"):
        assert f"- {title}: " in text
    for column in ("BLEU-4", "GLEU", "METEOR", "EM", "F1"):
        assert f"- {column}: " in text
    for phrase in ("ISODATA representatives", "chance %", "no ref ties", "k1", "k3", "healthy run"):
        assert phrase in text
    md = write_report_text(results)
    assert md.index("## How to read this report") < md.index("## Results") < md.index(format_table(results))


def write_report_text(results) -> str:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        return write_report(Path(folder), results)["md"].read_text()


def test_corpus_bleu_is_left_out_for_short_answers_and_kept_for_long_ones():
    short = _results()
    short["reference_tokens"] = {"median": 2.0}
    table = format_table(short)
    assert "corpus BLEU" not in table.splitlines()[0] and "left out" in table and "median of 2 tokens" in table
    assert len(_row_line(table, "SFT")) == 6  # system + five metric columns, no BLEU cell
    long = _results("dialogue")
    long["reference_tokens"] = {"median": float(MIN_BLEU_TOKENS + 7)}
    table = format_table(long)
    assert "corpus BLEU" in table.splitlines()[0] and _row_line(table, "SFT")[-1] == "3.00"
    assert "left out" not in table


def test_ppo_summary_uses_tenth_means_and_names_both_kl_estimators():
    steps = list(range(20))
    reward = [0.1 * i for i in range(20)]
    kl = [(-0.2 if i % 2 else 0.3) for i in range(20)]  # k1 alternates sign from batch to batch
    k3 = [0.05] * 20
    curves = {"str": {"step": steps, "reward/mean": reward, "objective/kl": kl, "objective/kl_k3": k3}}
    summary = curve_summary(curves)["str"]
    assert summary["reward/mean"]["start"] == pytest.approx((0.0 + 0.1) / 2)  # first tenth: 2 steps
    assert summary["reward/mean"]["end"] == pytest.approx((1.8 + 1.9) / 2)
    assert summary["objective/kl"]["min"] == -0.2 and summary["objective/kl_k3"]["min"] == 0.05
    text = format_curves(curves)
    assert "KL k1: start -> end" in text and "KL k3: start -> end" in text and "first / last tenth" in text


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 1) == [2.0, 4.0]
    assert moving_average([], 3) == []


def test_kl_plot_with_the_k3_curve_differs_from_one_without(tmp_path):
    results = _results()
    results["curves"]["str_noise"]["objective/kl_k3"] = [0.0, 0.1, 0.3]
    with_k3 = write_report(tmp_path / "a", results)["kl_png"].read_bytes()
    results["curves"]["str_noise"].pop("objective/kl_k3")
    without = write_report(tmp_path / "b", results)["kl_png"].read_bytes()
    assert with_k3[:8] == PNG_SIGNATURE and with_k3 != without
