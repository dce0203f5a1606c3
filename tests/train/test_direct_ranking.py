"""The direct-ranking variant (str_direct): no reward model; PPO rewards each answer with its TextRank
centrality standardised within its prompt's group of rollout answers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from selfrank.ranking.config import RankingConfig
from selfrank.ranking.ranker import Ranker
from selfrank.train import dist
from selfrank.errors import UserError
from selfrank.train.config import VARIANTS, ExperimentConfig, PPOConfig, TinyModelConfig
from selfrank.train.evaluation.report import ROW_TITLES
from selfrank.train.models.causal_lm import build_tiny_model, load_model, save_model, train_bpe_tokenizer
from selfrank.train.models.value_model import ValueModel
from selfrank.train.pipeline import run_pipeline
from selfrank.train.rl.group_reward import GroupRankingReward
from selfrank.train.rl.ppo_math import standardize_within_groups
from selfrank.train.rundir import RunDir
from selfrank.train.stages.ppo import train_ppo
from tests.train.helpers import tiny_config as tiny_experiment
from tests.train.test_ppo import PROMPTS, _texts, one_thread, read_log, tiny_config  # noqa: F401 (autouse fixture)


# ---- the pure maths ------------------------------------------------------------------------------
def test_standardize_within_groups_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.25, 0.25, 0.25, 4.0, 0.0, 2.0], dtype=torch.float32)
    out = standardize_within_groups(scores, 3)
    s = math.sqrt(2 / 3)  # population std of (1, 2, 3) and of (4, 0, 2) / 2
    expected = torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0, 2 / (2 * s), -2 / (2 * s), 0.0])
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32
    groups = out.view(3, 3)
    torch.testing.assert_close(groups.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(groups[[0, 2]].std(1, unbiased=False), torch.ones(2))
    # Equally central answers up to round-off: no signal, not amplified noise.
    assert torch.equal(standardize_within_groups(torch.tensor([0.5, 0.5 + 1e-12], dtype=torch.float64), 2),
                       torch.zeros(2, dtype=torch.float64))
    # Each group alone: the other groups do not move it.
    torch.testing.assert_close(standardize_within_groups(scores[6:], 3), out[6:])


def test_standardize_within_groups_refuses_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="multiple of 4"):
        standardize_within_groups(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        standardize_within_groups(torch.zeros(6), 0)


# ---- ranking each group (real Sentence-BERT) -----------------------------------------------------
def test_group_reward_is_the_samples_stage_ranking_standardised_per_group():
    config = RankingConfig()  # the packaged all-MiniLM-L6-v2, as the sample stage uses
    prompts = ["Where is the cat?", "Say hello."]
    texts = ["The cat is on the mat.", "The cat sits on the mat.", "A cat is on the mat.",
             "Interest rates rose in the third quarter.",
             "hello", "hello", "hello", "hello"]
    reward = GroupRankingReward(config, seed=0)
    raw, scores = reward(prompts, texts, 4, dist.get_accelerator())
    assert raw.shape == scores.shape == (8,) and scores.dtype == torch.float32
    ranked = Ranker(config).rank([{"id": str(i), "prompt": p, "responses": texts[i * 4:(i + 1) * 4]}
                                  for i, p in enumerate(prompts)])
    expected = torch.tensor([s for group in ranked for s in group.scores], dtype=torch.float64)
    torch.testing.assert_close(raw.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(raw.view(2, 4).sum(1), torch.ones(2))  # TextRank scores sum to 1 per group
    # The off-topic answer is the least central of its group, and the only one below the group's mean.
    assert int(scores[:4].argmin()) == 3 and (scores[:3] > 0).all() and scores[3] < -1
    assert float(scores[:4].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(scores[:4].std(unbiased=False)) == pytest.approx(1.0, rel=1e-5)
    # Four identical answers: every one equally central, so no reward signal at all.
    assert torch.equal(scores[4:], torch.zeros(4))
    # A function of the answers only: the same batch ranks the same again.
    again_raw, again = GroupRankingReward(config, seed=0)(prompts, texts, 4, dist.get_accelerator())
    assert torch.equal(again_raw, raw) and torch.equal(again, scores)


# ---- PPO without a reward model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(_texts(), vocab_size=300, extra_tokens=("<q>", "<a>"))
    model = build_tiny_model(TinyModelConfig(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=300),
                             tokenizer)
    folder = tmp_path_factory.mktemp("direct_world") / "sft"
    save_model(model, tokenizer, folder)
    return folder


def test_direct_ppo_trains_from_group_rewards_and_resume_equals_uninterrupted(sft, tmp_path):
    full = tiny_config(steps=4, samples_per_prompt=4, minibatches=2)
    summary = train_ppo(full, PROMPTS, sft, None, tmp_path / "full")
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    rows = read_log(tmp_path / "full")
    for row in rows:
        assert row["reward/mean"] == pytest.approx(0.0, abs=1e-6)  # standardised within every group
        assert row["reward/raw_mean"] == pytest.approx(1 / 4, abs=1e-6)  # centralities sum to 1 per group
        assert 0.0 <= row["reward/flat_groups"] < 1.0  # some groups had answers of differing centrality
        assert math.isfinite(row["loss/policy"]) and math.isfinite(row["loss/value"])
    assert not (tmp_path / "full" / "reward_model").exists()
    actor, _ = load_model(tmp_path / "full" / "actor")
    base, _ = load_model(sft)
    assert any(not torch.equal(a, b) for a, b in zip(actor.parameters(), base.parameters()))  # it trained

    train_ppo(tiny_config(steps=2, samples_per_prompt=4, minibatches=2), PROMPTS, sft, None, tmp_path / "cut")
    torch.manual_seed(999)  # the checkpoint must restore the RNGs
    resumed = train_ppo(full, PROMPTS, sft, None, tmp_path / "cut", resume=True)
    assert resumed["steps"] == 4 and resumed["episodes"] == summary["episodes"]
    b, _ = load_model(tmp_path / "cut" / "actor")
    for (name, x), (_, y) in zip(actor.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    ca = ValueModel.from_pretrained(tmp_path / "full" / "critic")
    cb = ValueModel.from_pretrained(tmp_path / "cut" / "critic")
    for (name, x), (_, y) in zip(ca.state_dict().items(), cb.state_dict().items()):
        assert torch.equal(x, y), name
    cut_rows = read_log(tmp_path / "cut")
    assert [r["step"] for r in cut_rows] == [1, 2, 3, 4]
    for x, y in zip(rows, cut_rows):
        assert x["reward/raw_mean"] == y["reward/raw_mean"] and x["loss/policy"] == y["loss/policy"]


def test_two_answers_are_always_equally_central_so_str_direct_needs_three():
    """Why str_direct asks for at least 3 answers per prompt: a pair's similarity graph is symmetric."""
    raw, scores = GroupRankingReward(RankingConfig())(["Where is the cat?"], ["On the mat.", "Rates rose."], 2,
                                                      dist.get_accelerator())
    assert float(raw[0]) == pytest.approx(float(raw[1]), abs=1e-9) and torch.equal(scores, torch.zeros(2))


@pytest.mark.parametrize("k", [1, 2])
def test_too_few_answers_per_prompt_are_refused(sft, tmp_path, k):
    with pytest.raises(UserError, match=f"ppo.samples_per_prompt: must be >= 3 .*str_direct.*got {k}"):
        ExperimentConfig(variants=["str", "str_direct"], ppo=PPOConfig(samples_per_prompt=k, minibatches=1))
    with pytest.raises(UserError, match=f"ppo.samples_per_prompt: must be >= 3 .*str_direct.*got {k}"):
        train_ppo(tiny_config(steps=1, samples_per_prompt=k, minibatches=1), PROMPTS, sft, None, tmp_path / "ppo")
    assert not (tmp_path / "ppo").exists()


def test_direct_variant_needs_no_reward_model():
    assert not VARIANTS["str_direct"].needs_reward_model
    assert all(VARIANTS[v].needs_reward_model for v in ("str", "str_noise", "str_listwise", "str_online"))


# ---- the whole pipeline ---------------------------------------------------------------------------
def test_pipeline_with_only_str_direct_trains_no_reward_model_and_reports_its_row(tmp_path):
    config = tiny_experiment(tmp_path, name="direct", variants=["str_direct"],
                             ppo=PPOConfig(steps=2, batch_size=4, samples_per_prompt=3, minibatches=2, ppo_epochs=1,
                                           max_new_tokens=8, save_every=1))
    summaries = run_pipeline(config)
    run = RunDir(tmp_path / "direct")
    for stage in ("sft", "sample", "reward", "ppo", "ppo/str_direct", "eval"):
        assert run.is_done(stage), stage
    assert not (run.root / "reward" / "str_direct").exists()
    assert summaries["reward"]["variants"] == {}
    assert summaries["reward"]["without_reward_model"] == {
        "str_direct": "no reward model: str_direct ranks rollouts directly"}
    assert (run.root / "ppo" / "str_direct" / "actor" / "model.safetensors").is_file()
    rows = read_log(run.root / "ppo" / "str_direct")
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward/flat_groups"] < 1.0 for r in rows)
    report = json.loads((run.root / "eval" / "report.json").read_text())
    assert "str_direct" in report["rows"]
    study = json.dumps(report.get("agreement"))
    assert "textrank" in study.lower() and "reward:" not in study  # no reward model to compare
    assert ROW_TITLES["str_direct"] in (run.root / "eval" / "report.md").read_text()
