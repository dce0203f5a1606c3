"""str_direct PPO (no reward model: each rollout group ranked with the real Sentence-BERT) on 2 gloo DDP
processes, killed after 2 of 3 steps and resumed, against one process.

The main process ranks the whole gathered batch in one call and broadcasts the rewards, so the rewards
are a function of the batch's answers only and the 2-process run follows the one-process trajectory up
to float summation order (tolerances as in test_ppo_distributed.py)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.train.test_distributed import finish, start
from tests.train.test_ppo import PROMPTS, _texts
from tests.train.test_ppo_distributed import PPO, assert_same_models, assert_same_trajectory, command, read_log
from selfrank.train.config import TinyModelConfig
from selfrank.train.models.causal_lm import build_tiny_model, save_model, train_bpe_tokenizer

DIRECT = {**PPO, "samples_per_prompt": 4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("direct_dist")
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(_texts(), vocab_size=300, extra_tokens=("<q>", "<a>"))
    save_model(build_tiny_model(TinyModelConfig(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=300),
                                tokenizer), tokenizer, root / "sft")
    world = {"sft": root / "sft", "rm": "none", "prompts": root / "prompts.json"}
    world["prompts"].write_text(json.dumps(PROMPTS))
    procs = {"single": start(*command("single", world, root / "single", DIRECT), root / "single.log")[0],
             "ddp": start(*command("ddp", world, root / "ddp", {**DIRECT, "steps": 2}), root / "ddp.log")[0]}
    for name, proc in procs.items():
        finish(proc, root / f"{name}.log", 600)
    resume = start(*command("ddp", world, root / "ddp", DIRECT, "--resume"), root / "ddp_resume.log")[0]
    finish(resume, root / "ddp_resume.log", 600)
    return {"single": root / "single", "ddp": root / "ddp"}


@pytest.mark.slow
def test_direct_ranking_on_two_processes_with_resume_follows_the_one_process_trajectory(runs):
    # The second launch resumed the step-2 checkpoint: it ran step 3 only.
    info = json.loads((runs["ddp"] / "run.json").read_text())
    assert info["steps_run"] == [3] and info["world_size"] == 2
    assert info["summary"]["steps"] == 3 and info["summary"]["episodes"] == 3 * 4 * 4
    one, two = read_log(runs["single"]), read_log(runs["ddp"])
    assert_same_trajectory(one, two)
    for a, b in zip(one, two):
        # The rewards came from ranking: centralities sum to 1 per group of 4; some groups gave a signal.
        assert a["reward/raw_mean"] == pytest.approx(0.25, abs=1e-6) and a["reward/flat_groups"] < 1.0
        assert b["reward/flat_groups"] == a["reward/flat_groups"]
    assert not (runs["ddp"] / "reward_model").exists()
    assert_same_models(runs["single"], runs["ddp"])
