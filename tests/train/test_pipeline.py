"""The whole pipeline in one process on the tiny test config: every stage's outputs, skip on rerun."""
from __future__ import annotations

import dataclasses
import json

from tests.train.helpers import tiny_config
from selfrank.train.config import SFTConfig
from selfrank.train.pipeline import run_pipeline
from selfrank.train.stages.evaluate import eval_rows
from selfrank.train.rundir import RunDir


def test_full_pipeline_writes_every_stage_and_skips_complete_ones(tmp_path, capsys):
    config = tiny_config(tmp_path, name="e2e", sft=SFTConfig(lr=1e-3, batch_size=8, max_steps=4, block_size=64,
                                                              baselines=["bitfit"]))
    summaries = run_pipeline(config)
    run = RunDir(tmp_path / "e2e")
    for stage in ("sft", "sample", "reward", "reward/str", "reward/str_noise", "ppo", "ppo/str", "ppo/str_noise",
                  "eval"):
        assert run.is_done(stage), stage
    assert (run.root / "config.yaml").is_file()
    assert (run.root / "sft" / "original" / "model.safetensors").is_file()
    assert (run.root / "sft" / "baselines" / "bitfit" / "model" / "model.safetensors").is_file()
    ranked = [json.loads(line) for line in (run.root / "sample" / "ranked.jsonl").read_text().splitlines()]
    assert len(ranked) == config.sample.max_prompts
    assert all(len(group["responses"]) == config.sample.samples_per_prompt for group in ranked)
    pairs = (run.root / "sample" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == summaries["sample"]["pairs"]
    assert (run.root / "ppo" / "str" / "actor" / "model.safetensors").is_file()
    report = json.loads((run.root / "eval" / "report.json").read_text())
    assert list(report["rows"]) == ["original", "sft", "bitfit", "str", "str_noise"]
    assert [name for name, _ in eval_rows(config, run)] == list(report["rows"])
    assert "| STR + noise |" in capsys.readouterr().out  # the report table is printed at the end

    stamps = {p: p.stat().st_mtime_ns for p in run.root.rglob("DONE.json")}
    again = run_pipeline(config)
    assert {p: p.stat().st_mtime_ns for p in run.root.rglob("DONE.json")} == stamps
    assert again["eval"]["rows"] == summaries["eval"]["rows"]


def test_a_completed_stage_whose_settings_changed_is_redone(tmp_path):
    config = tiny_config(tmp_path, name="changed", sft=SFTConfig(lr=1e-3, batch_size=8, max_steps=2, block_size=64))
    run_pipeline(config, ["sft", "sample"])
    run = RunDir(tmp_path / "changed")
    sft_stamp = (run.root / "sft" / "DONE.json").stat().st_mtime_ns
    sample_stamp = (run.root / "sample" / "DONE.json").stat().st_mtime_ns
    # Eval settings do not touch sft or sample: both are kept.
    run_pipeline(dataclasses.replace(config, eval=dataclasses.replace(config.eval, max_new_tokens=5)), ["sft", "sample"])
    assert (run.root / "sample" / "DONE.json").stat().st_mtime_ns == sample_stamp
    # A new K changes what sample writes: it is redone, sft is kept.
    changed = dataclasses.replace(config, sample=dataclasses.replace(config.sample, samples_per_prompt=3))
    run_pipeline(changed, ["sft", "sample"])
    assert (run.root / "sft" / "DONE.json").stat().st_mtime_ns == sft_stamp
    assert (run.root / "sample" / "DONE.json").stat().st_mtime_ns != sample_stamp
    ranked = [json.loads(line) for line in (run.root / "sample" / "ranked.jsonl").read_text().splitlines()]
    assert ranked and all(len(group["responses"]) == 3 for group in ranked)


def test_adding_the_noise_variant_redoes_the_sample_stage(tmp_path):
    """Noise records are written only when a noise variant is listed: a sample stage run for plain STR
    must not be reused by str_noise (its reward model would train on un-noised pairs)."""
    config = tiny_config(tmp_path, name="noise", variants=["str"],
                         sft=SFTConfig(lr=1e-3, batch_size=8, max_steps=2, block_size=64))
    config.ranking.noise.probability = 1.0
    run_pipeline(config, ["sft", "sample"])
    root = RunDir(tmp_path / "noise").root
    pairs = [json.loads(line) for line in (root / "sample" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and not any(p["loser_noised"] for p in pairs)
    run_pipeline(dataclasses.replace(config, variants=["str", "str_noise"]), ["sft", "sample"])
    pairs = [json.loads(line) for line in (root / "sample" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and any(p["loser_noised"] for p in pairs)
