"""The whole pipeline in one process on the tiny test config: every stage's outputs, skip on rerun."""
from __future__ import annotations

import dataclasses
import json

import pytest

from tests.train.helpers import tiny_config
from selfrank.errors import UserError
from selfrank.train.config import SFTConfig
from selfrank.train.pipeline import run_pipeline
from selfrank.train.stages.evaluate import eval_rows
from selfrank.train.rundir import RunDir


def test_full_pipeline_writes_every_stage_and_skips_complete_ones(tmp_path):
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
    assert list(report["rows"]) == ["original", "sft", "bitfit", "str", "str_noise", "sft_greedy", "sft_majority",
                                     "sft_rerank_str", "sft_rerank_str_noise", "str_greedy", "str_noise_greedy"]
    assert [name for name, _ in eval_rows(config, run)] == list(report["rows"])[:-6]  # then the controls, greedy twins
    # each earlier stage's wall time as its DONE.json recorded it, then eval's own
    assert list(report["stage_seconds"]) == ["sft", "sample", "reward", "ppo", "eval"]
    for stage in ("sft", "sample", "reward", "ppo"):
        assert report["stage_seconds"][stage] == run.summary(stage)["stage_seconds"] > 0
    assert 0 < report["stage_seconds"]["eval"] <= run.summary("eval")["stage_seconds"]
    assert "## Wall time per stage" in (run.root / "eval" / "report.md").read_text()
    # each SFT method's learning rate, as its training recorded it
    assert report["sft_learning_rates"] == {"full": {"lr": 1e-3, "search": None}, "bitfit": {"lr": 1e-3, "search": None}}
    assert "## SFT learning rates" in (run.root / "eval" / "report.md").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in run.root.rglob("DONE.json")}
    again = run_pipeline(config)
    assert {p: p.stat().st_mtime_ns for p in run.root.rglob("DONE.json")} == stamps
    assert again["eval"]["rows"] == summaries["eval"]["rows"]


def _stamps(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_finished_stage_whose_settings_changed_is_refused_then_replaced_with_force(tmp_path):
    config = tiny_config(tmp_path, name="changed", sft=SFTConfig(lr=1e-3, batch_size=8, max_steps=2, block_size=64))
    run_pipeline(config, ["sft", "sample"])
    run = RunDir(tmp_path / "changed")
    sft_stamp = (run.root / "sft" / "DONE.json").stat().st_mtime_ns
    sample_stamp = (run.root / "sample" / "DONE.json").stat().st_mtime_ns
    # Eval settings do not touch sft or sample: both are kept.
    run_pipeline(dataclasses.replace(config, eval=dataclasses.replace(config.eval, max_new_tokens=5)), ["sft", "sample"])
    assert (run.root / "sample" / "DONE.json").stat().st_mtime_ns == sample_stamp
    # A new K changes what sample writes: refused without consent, before anything is written, naming the change.
    changed = dataclasses.replace(config, sample=dataclasses.replace(config.sample, samples_per_prompt=3))
    before = _stamps(run.root)
    with pytest.raises(UserError) as refused:
        run_pipeline(changed, ["sft", "sample"])
    message = str(refused.value)
    assert "sample (sample.samples_per_prompt: 4 -> 3)" in message and "sft" not in message.split(":")[1]
    assert "--set name=" in message and "--force" in message and "\n" not in message
    assert _stamps(run.root) == before
    # With consent (force) it is replaced; sft, whose settings did not change, is kept.
    summaries = run_pipeline(changed, ["sft", "sample"], force=True)
    assert (run.root / "sft" / "DONE.json").stat().st_mtime_ns == sft_stamp
    assert (run.root / "sample" / "DONE.json").stat().st_mtime_ns != sample_stamp
    ranked = [json.loads(line) for line in (run.root / "sample" / "ranked.jsonl").read_text().splitlines()]
    assert ranked and all(len(group["responses"]) == 3 for group in ranked)
    assert summaries["sample"]["settings"]["sample"]["samples_per_prompt"] == 3
    assert not (run.root / "sample.new").exists() and not (run.root / "sample.old").exists()


def test_a_failed_replacement_leaves_the_finished_stage_as_it_was(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, name="keep", sft=SFTConfig(lr=1e-3, batch_size=8, max_steps=2, block_size=64))
    run_pipeline(config, ["sft", "sample"])
    root = tmp_path / "keep"
    finished = _stamps(root / "sample")
    import selfrank.train.stages.sample as sample_stage

    real_run = sample_stage.run

    def run_then_fail(config, run, resume, ctx):  # the replacement gets under way, then the machine fails
        real_run(config, run, resume, ctx)
        (run.path("sample") / "DONE.json").unlink(missing_ok=True)
        raise OSError("simulated failure after the stage wrote its files")

    monkeypatch.setattr(sample_stage, "run", run_then_fail)
    changed = dataclasses.replace(config, sample=dataclasses.replace(config.sample, samples_per_prompt=3))
    with pytest.raises(OSError, match="simulated failure"):
        run_pipeline(changed, ["sft", "sample"], force=True)
    assert _stamps(root / "sample") == finished  # the finished stage is untouched
    partial = root / "sample.new"
    assert (partial / "ranked.jsonl").is_file() and not (partial / "DONE.json").exists()
    # The next run with the old settings still finds the finished stage current.
    monkeypatch.undo()
    assert run_pipeline(config, ["sft", "sample"])["sample"]["settings_digest"] == json.loads(
        finished["DONE.json"])["settings_digest"]


def test_a_kill_during_the_swap_is_finished_on_the_next_start(tmp_path):
    run = RunDir(tmp_path)
    # Killed after the finished stage moved to .old, before the replacement moved in.
    (tmp_path / "ppo.old").mkdir()
    (tmp_path / "ppo.old" / "DONE.json").write_text('{"v": "old"}')
    (tmp_path / "ppo.new").mkdir()
    (tmp_path / "ppo.new" / "DONE.json").write_text('{"v": "new"}')
    # Killed while a replacement was still incomplete (no DONE): the old one goes back.
    (tmp_path / "eval.old").mkdir()
    (tmp_path / "eval.old" / "DONE.json").write_text('{"v": "old"}')
    (tmp_path / "eval.new").mkdir()
    run.recover(["ppo", "eval"])
    assert run.summary("ppo") == {"v": "new"} and run.summary("eval") == {"v": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "eval.new", "ppo"]


def test_unfinished_work_is_kept_without_resume_and_restarted_with_force(tmp_path):
    from selfrank.train.data.tasks import load_task
    from selfrank.train.pipeline import plan_stages
    from selfrank.train.stages.sft import train_sft
    from tests.train.helpers import tiny_policy

    config = tiny_config(tmp_path, name="cut", sft=SFTConfig(lr=1e-3, batch_size=8, max_steps=6, block_size=64,
                                                            save_every=2))
    sft = tmp_path / "cut" / "sft"
    model, tokenizer = tiny_policy(None, config)
    train_sft(config, load_task(config.task), model, tokenizer, "full", sft, stop_after=3)  # as if killed at step 3
    with pytest.raises(UserError) as refused:
        run_pipeline(config, ["sft"])
    message = str(refused.value)
    assert "sft (a checkpoint at step 2 in sft/checkpoint)" in message and "--resume" in message
    assert (sft / "checkpoint" / "state.json").is_file()
    (plan,) = plan_stages(config, ["sft"], resume=True)
    assert (plan.action, plan.resume) == ("resume", True)
    (plan,) = plan_stages(config, ["sft"], force=True)
    assert (plan.action, plan.resume) == ("restart", False)


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
    with_noise = dataclasses.replace(config, variants=["str", "str_noise"])
    with pytest.raises(UserError, match=r"sample \(ranking.noise.enabled: false -> true\)"):
        run_pipeline(with_noise, ["sft", "sample"])
    run_pipeline(with_noise, ["sft", "sample"], force=True)
    pairs = [json.loads(line) for line in (root / "sample" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and any(p["loser_noised"] for p in pairs)


def test_a_setting_added_since_a_stage_finished_at_its_default_is_no_change(tmp_path):
    """Upgrading selfrank adds settings; a stage recorded before they existed stays current while they
    keep their defaults, and is stale as soon as one of them, or an old one, differs."""
    from selfrank.train.config import ExperimentConfig
    from selfrank.train.pipeline import same_settings, stage_settings

    config = ExperimentConfig(output_dir=str(tmp_path))
    recorded = stage_settings(config, "eval")
    del recorded["eval"]["controls"], recorded["reward"]["model"]  # as a stage made before both existed
    assert same_settings("eval", recorded, "an-old-digest", config)
    assert not same_settings("eval", recorded, "an-old-digest",
                             dataclasses.replace(config, eval=dataclasses.replace(config.eval, controls=False)))
    assert not same_settings("eval", recorded, "an-old-digest",
                             dataclasses.replace(config, eval=dataclasses.replace(config.eval, max_new_tokens=9)))
    assert not same_settings("eval", None, "an-old-digest", config)  # nothing recorded to compare
