"""Reward models as Hugging Face sequence classifiers: every saved reward model loads with
``AutoModelForSequenceClassification`` and scores as selfrank does; ``reward.model`` imports such a folder."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from selfrank.errors import UserError
from selfrank.launch.cli import main
from selfrank.train.data.synthetic import make_task
from selfrank.train.models.causal_lm import save_model
from selfrank.train.models.reward_interop import check_classifier_source, reward_model_from_classifier
from selfrank.train.models.reward_model import RewardModel, encode_pairs, score
from selfrank.train.pipeline import run_pipeline
from selfrank.train.rundir import RunDir
from tests.train.helpers import tiny_chat_config, tiny_chat_policy, tiny_config, tiny_policy

RESPONSES = ["tom", "a red cup and a gray box near the lamp and the door .", "yes", "5", "the box is gray ."]


def _trained_looking_rm(lm, tokenizer) -> RewardModel:
    """A reward model whose head, head bias and normaliser are all away from their defaults."""
    rm = RewardModel.from_causal_lm(lm, tokenizer=tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        rm.head.weight.normal_(std=0.5)
        rm.head.bias.fill_(0.3)
    rm.set_normalizer(gain=2.5, bias=-0.5)
    return rm


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exported_folder_loads_as_a_sequence_classifier_and_scores_the_same(arch, tmp_path):
    config = tiny_config() if arch == "gpt2" else tiny_chat_config()
    lm, tokenizer = tiny_policy(config=config) if arch == "gpt2" else tiny_chat_policy(config=config)
    rm = _trained_looking_rm(lm, tokenizer)
    prompts = [ex.prompt for ex in make_task(config.task.synthetic, config.task.prompt).test[:len(RESPONSES)]]
    expected = score(rm, tokenizer, prompts, RESPONSES, batch_size=3, max_length=96)
    rm.save_pretrained(tmp_path / "rm")

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", trust_remote_code=False).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert type(hf).__name__ == {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification"}[arch]
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert hf_tokenizer.padding_side == "right"
    # The same token ids selfrank scores, padded by the tokenizer itself, in one batch of several lengths.
    ids = encode_pairs(hf_tokenizer, prompts, RESPONSES, 96)
    assert len({len(row) for row in ids}) >= 3
    batch = hf_tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    assert int((batch["attention_mask"] == 0).sum()) > 0
    with torch.no_grad():
        logits = hf(**batch).logits
    assert logits.shape == (len(ids), 1)
    offset = hf.config.reward_offset
    assert offset == pytest.approx(2.5 * 0.3 - 0.5, abs=1e-6)
    np.testing.assert_allclose(logits[:, 0].numpy() + offset, expected, rtol=0, atol=1e-5)
    # The scores are not all one value (the comparison above would then be weak).
    assert float(np.ptp(expected)) > 1e-3

    # Both ways back into selfrank give the same rewards: its own files, and the classifier alone.
    ours = RewardModel.from_pretrained(tmp_path / "rm")
    np.testing.assert_allclose(score(ours, ours.tokenizer, prompts, RESPONSES, max_length=96), expected, atol=1e-5)
    imported = reward_model_from_classifier(str(tmp_path / "rm"))
    np.testing.assert_allclose(score(imported, imported.tokenizer, prompts, RESPONSES, max_length=96), expected,
                               atol=1e-5)


def _hf_classifier(lm_folder, out, num_labels: int = 1):
    """A classifier folder written by transformers alone (not by selfrank), on a causal LM's weights."""
    model = AutoModelForSequenceClassification.from_pretrained(lm_folder, num_labels=num_labels)
    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(2)
    with torch.no_grad():
        model.score.weight.normal_(std=0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model.eval(), tokenizer


def test_pipeline_with_reward_model_trains_none_and_ppo_uses_it(tmp_path):
    config = tiny_config(tmp_path, name="imported", variants=["str"])
    run_pipeline(config, ["sft", "sample"])
    run = RunDir(tmp_path / "imported")
    hf, tokenizer = _hf_classifier(run.root / "sft" / "model", tmp_path / "outside_rm")

    imported = dataclasses.replace(config, reward=dataclasses.replace(config.reward, model=str(tmp_path / "outside_rm")))
    summaries = run_pipeline(imported, ["reward", "ppo"])
    summary = json.loads((run.root / "reward" / "str" / "DONE.json").read_text())
    assert summary["imported_from"] == str(tmp_path / "outside_rm")
    assert summary["trained"] is False and summary["steps"] == 0
    assert summaries["reward"]["imported_from"] == str(tmp_path / "outside_rm")
    assert not (run.root / "reward" / "str" / "checkpoint").exists()

    # What PPO read is the outside model, normalised on the SFT samples (mean 0, std 1 there).
    rm = RewardModel.from_pretrained(run.root / "reward" / "str" / "model")
    groups = [json.loads(line) for line in (run.root / "sample" / "ranked.jsonl").read_text().splitlines()]
    prompts = [g["prompt"] for g in groups for _ in g["responses"]]
    responses = [r for g in groups for r in g["responses"]]
    ours = score(rm, rm.tokenizer, prompts, responses, max_length=config.reward.max_length)
    assert abs(float(ours.mean())) < 1e-4 and float(ours.std()) == pytest.approx(1.0, abs=1e-3)
    ids = encode_pairs(tokenizer, prompts, responses, config.reward.max_length)
    tokenizer.padding_side = "right"
    with torch.no_grad():
        theirs = hf(**tokenizer.pad({"input_ids": ids}, return_tensors="pt")).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, float(rm.gain) * theirs + float(rm.bias), atol=1e-4)
    rows = [json.loads(line) for line in (run.root / "ppo" / "str" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == config.ppo.steps and run.is_done("ppo/str")


def _assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


def test_a_folder_that_is_not_a_one_label_classifier_is_refused(tmp_path, capsys, monkeypatch):
    lm, tokenizer = tiny_policy()
    save_model(lm, tokenizer, tmp_path / "lm")
    _hf_classifier(tmp_path / "lm", tmp_path / "two_labels", num_labels=2)
    with pytest.raises(UserError, match="num_labels 2"):
        check_classifier_source(str(tmp_path / "two_labels"))
    with pytest.raises(UserError, match="num_labels 2"):  # a causal LM: no labels set, transformers' default
        check_classifier_source(str(tmp_path / "lm"))
    with pytest.raises(UserError, match="no config.json"):
        check_classifier_source(str(tmp_path / "missing"))

    # From the command line: one line, exit 2, before any run folder exists.
    monkeypatch.chdir(tmp_path)
    for folder, fragment in ((tmp_path / "missing", "no config.json"), (tmp_path / "two_labels", "num_labels 2")):
        path = tmp_path / "config.yaml"
        path.write_text(f"name: t\nreward: {{model: '{folder}'}}\n")
        code = main(["run", str(path)])
        _assert_one_line_error(code, capsys.readouterr().err, f"reward.model: {folder}")
        assert not (tmp_path / "runs").exists()
