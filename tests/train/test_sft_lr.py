"""SFT learning rates: one per method (``sft.method_lr``) or chosen per method on the validation split
(``sft.lr_search``), resumable candidate by candidate, and listed in the report."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from selfrank.errors import UserError
from selfrank.launch.config import load_experiment
from selfrank.train.data.prompts import format_task
from selfrank.train.data.synthetic import make_task
from selfrank.train.evaluation.report import format_sft_learning_rates
from selfrank.train.models.causal_lm import load_model
from selfrank.train.rundir import RunDir
from selfrank.train.stages import sft

from tests.train.helpers import tiny_config, tiny_policy

# A rate too small to move the model in 6 steps, one that learns, and one that blows the weights up.
TOO_SMALL, LEARNS, DIVERGES = 1e-7, 3e-3, 1e30


def _config(tmp_path, **sft_changes):
    cfg = tiny_config(tmp_path)
    cfg.sft = dataclasses.replace(cfg.sft, **{"method": "full", **sft_changes})
    return cfg


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _validation_loss(cfg, folder):
    model, tok = load_model(folder)
    data = format_task(make_task(cfg.task.synthetic, cfg.task.prompt), tok, cfg)
    return sft.validation_loss(model, tok, data.validation, cfg.sft.block_size, cfg.sft.batch_size)


def test_search_keeps_the_lowest_validation_loss_and_trains_it_as_a_plain_run_would(tmp_path):
    cfg = _config(tmp_path, lr_search=[TOO_SMALL, LEARNS, DIVERGES])
    run = RunDir.for_config(cfg)
    summary = sft.run(cfg, run, resume=False)["runs"]["full"]
    tried = {t["lr"]: t["validation_loss"] for t in summary["lr_search"]}
    assert list(tried) == [TOO_SMALL, LEARNS, DIVERGES]
    assert tried[DIVERGES] is None  # recorded, not fatal
    assert summary["lr"] == LEARNS and tried[LEARNS] < tried[TOO_SMALL]
    assert summary["validation_examples"] == cfg.task.synthetic.n_validation
    stage = run.root / "sft"
    # The recorded loss is the kept model's, measured again from its folder.
    assert _validation_loss(cfg, stage / "model") == pytest.approx(tried[LEARNS], rel=1e-5)
    # The kept model is what a plain run at that rate trains: same weights, bit for bit.
    model, tok = load_model(stage / "original")
    sft.train_sft(cfg, make_task(cfg.task.synthetic, cfg.task.prompt), model, tok, "full", tmp_path / "plain",
                  lr=LEARNS)
    a, b = _weights(stage / "model"), _weights(tmp_path / "plain" / "model")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # Candidates keep their summaries, not their models.
    for lr in tried:
        folder = sft.candidate_folder(stage, lr)
        assert (folder / sft.SUMMARY).is_file() and not (folder / "model").exists()


def test_a_killed_search_resumes_without_retraining_finished_candidates(tmp_path, monkeypatch):
    cfg = _config(tmp_path, lr_search=[TOO_SMALL, LEARNS], save_every=2)
    plain = sft.train_sft

    def killed_during_the_second(*args, lr=None, **kwargs):
        if lr == LEARNS:  # as a killed job: a checkpoint at step 2, no model, then the process is gone
            plain(*args, lr=lr, stop_after=3, **kwargs)
            raise SystemExit(1)
        return plain(*args, lr=lr, **kwargs)

    run = RunDir.for_config(cfg)
    monkeypatch.setattr(sft, "train_sft", killed_during_the_second)
    with pytest.raises(SystemExit):
        sft.run(cfg, run, resume=False)
    stage = run.root / "sft"
    first = sft.candidate_folder(stage, TOO_SMALL) / sft.SUMMARY
    assert first.is_file() and not (stage / "model").exists()
    before = first.read_text()
    monkeypatch.setattr(sft, "train_sft", plain)
    summary = sft.run(cfg, run, resume=True)["runs"]["full"]
    assert first.read_text() == before  # scored once, not retrained
    assert [t["lr"] for t in summary["lr_search"]] == [TOO_SMALL, LEARNS] and summary["resumed_from"] == 2
    uninterrupted = dataclasses.replace(cfg, output_dir=str(tmp_path / "straight"))
    straight = RunDir.for_config(uninterrupted)
    sft.run(uninterrupted, straight, resume=False)
    a, b = _weights(stage / "model"), _weights(straight.root / "sft" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_candidate_diverging_or_no_validation_split_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="every learning rate"):
        sft.choose_lr([{"lr": 1.0, "validation_loss": None}, {"lr": 2.0, "validation_loss": None}])
    assert sft.choose_lr([{"lr": 1.0, "validation_loss": 2.0}, {"lr": 2.0, "validation_loss": 2.0}])["lr"] == 1.0
    cfg = _config(tmp_path, lr_search=[LEARNS])
    data = dataclasses.replace(make_task(cfg.task.synthetic, cfg.task.prompt), validation=[])
    _, tok = tiny_policy(tmp_path)
    with pytest.raises(UserError, match="no validation examples"):
        sft.train_with_lr_search(cfg, data, tmp_path / "policy", "full", tmp_path / "out")


def test_a_search_for_one_method_leaves_the_others_at_their_rate(tmp_path):
    cfg = _config(tmp_path, method="lora", baselines=["full"], lr_search={"full": [TOO_SMALL, LEARNS]})
    runs = sft.run(cfg, RunDir.for_config(cfg), resume=False)["runs"]
    assert runs["lora"]["lr"] == cfg.sft.lr and "lr_search" not in runs["lora"]
    assert [t["lr"] for t in runs["full"]["lr_search"]] == [TOO_SMALL, LEARNS] and runs["full"]["lr"] == LEARNS


def test_each_candidate_logs_its_curve_under_its_own_rate(tmp_path):
    cfg = _config(tmp_path, lr_search=[TOO_SMALL, LEARNS], max_steps=2)
    _, tok = tiny_policy(tmp_path)
    logged = []
    sft.train_with_lr_search(cfg, make_task(cfg.task.synthetic, cfg.task.prompt), tmp_path / "policy", "full",
                             tmp_path / "out", log_step=lambda metrics, step: logged.append((sorted(metrics), step)))
    assert logged == [(["lr=1e-07/loss", "lr=1e-07/lr"], 1), (["lr=1e-07/loss", "lr=1e-07/lr"], 2),
                      (["lr=0.003/loss", "lr=0.003/lr"], 1), (["lr=0.003/loss", "lr=0.003/lr"], 2)]


def test_method_lr_sets_one_method_and_leaves_the_others_at_sft_lr(tmp_path):
    cfg = _config(tmp_path, method="lora", baselines=["full"], method_lr={"full": 3e-4}, max_steps=1,
                  baseline_max_steps=1)
    runs = sft.run(cfg, RunDir.for_config(cfg), resume=False)["runs"]
    assert runs["full"]["lr"] == 3e-4 and runs["lora"]["lr"] == cfg.sft.lr


@pytest.mark.parametrize("override, message", [
    ("sft.method_lr={fulll: 1.0e-4}", "sft.method_lr"),
    ("sft.method_lr={full: -1}", "sft.method_lr.full"),
    ("sft.lr_search=[1.0e-4, 1.0e-4]", "twice"),
    ("sft.lr_search=[0]", "sft.lr_search"),
    ("sft.lr_search={full: [1.0e-4, 1.0e-4]}", "sft.lr_search.full: .* twice"),
    ("sft.lr_search={ful: [1.0e-4]}", "sft.lr_search"),
    ("sft.lr_search=1.0e-4", "sft.lr_search"),
])
def test_bad_learning_rate_settings_name_the_setting(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\n")
    with pytest.raises(UserError, match=message):
        load_experiment(path, [override])
    with pytest.raises(UserError, match="both set the learning rate of full"):
        load_experiment(path, ["sft.lr_search=[1.0e-4]", "sft.method_lr={full: 1.0e-4}"])
    with pytest.raises(UserError, match="both set the learning rate of full"):
        load_experiment(path, ["sft.lr_search={full: [1.0e-4]}", "sft.method_lr={full: 1.0e-4}"])


def test_yaml_rates_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\nsft:\n  method_lr: {full: 1e-4}\n")
    cfg = load_experiment(path)
    assert cfg.sft.method_lr == {"full": 1e-4}
    assert cfg.sft.lr_for("full") == 1e-4 and cfg.sft.lr_for("lora") == cfg.sft.lr
    path.write_text("name: c\nsft:\n  lr_search: [1e-3, 3e-4]\n")
    assert load_experiment(path).sft.candidates_for("bitfit") == [1e-3, 3e-4]
    path.write_text("name: c\nsft:\n  lr_search: {full: [1e-4, 1e-5]}\n  method_lr: {bitfit: 1e-2}\n")
    cfg = load_experiment(path)
    assert cfg.sft.candidates_for("full") == [1e-4, 1e-5] and cfg.sft.candidates_for("lora") == []
    assert cfg.sft.lr_for("bitfit") == 1e-2


def test_report_lists_each_methods_rate_and_the_search_behind_it():
    text = format_sft_learning_rates({"sft_learning_rates": {
        "lora": {"lr": 1e-3, "search": None},
        "full": {"lr": 3e-4, "search": [{"lr": 1e-3, "validation_loss": 2.5}, {"lr": 3e-4, "validation_loss": 2.25},
                                       {"lr": 1e30, "validation_loss": None}]}}})
    assert text.splitlines() == ["- LoRA: 0.001",
                                 "- full fine-tuning: 0.0003 (lowest validation loss of 0.001 -> 2.5000, "
                                 "0.0003 -> 2.2500, 1e+30 -> diverged)"]
