"""The real SmolLM2-135M-Instruct through every stage (sft -> sample -> reward -> ppo -> eval) with
``selfrank run`` on the shipped CPU config for SQuAD v2, shrunk by overrides to a few steps per stage:
chat prompts, a LoRA policy in PPO, answers that end with the template's end of turn."""
from __future__ import annotations

import json
import time

import pytest

from selfrank.launch.cli import main as cli_main
from selfrank.train.models.causal_lm import load_tokenizer

from tests.train.test_distributed import REPO

CONFIG = REPO / "configs" / "smollm2_squad_v2_cpu.yaml"


@pytest.mark.slow
def test_smollm2_squad_v2_through_every_stage(tmp_path, shared_data):
    overrides = {
        "name": "smol-e2e", "output_dir": str(tmp_path / "runs"), "torch_threads": 1,
        "task.train": str(shared_data / "squad_v2" / "dev.jsonl"),
        "task.max_train": 8, "task.max_validation": 4, "task.max_test": 4, "task.prompt.max_tokens": 96,
        "sft.max_steps": 2, "sft.batch_size": 4, "sft.block_size": 112, "sft.baselines": "[]",
        "sample.samples_per_prompt": 2, "sample.max_new_tokens": 8, "sample.max_prompts": 4, "sample.batch_size": 4,
        "sample.async_ranking": "false",
        "reward.max_steps": 2, "reward.batch_size": 2, "reward.max_length": 112, "reward.heldout_fraction": 0.25,
        "ppo.steps": 2, "ppo.batch_size": 2, "ppo.samples_per_prompt": 1, "ppo.minibatches": 1, "ppo.ppo_epochs": 1,
        "ppo.max_new_tokens": 8, "ppo.policy": "lora", "ppo.save_every": 10,
        "eval.max_examples": 4, "eval.max_new_tokens": 8, "eval.batch_size": 4, "eval.samples_per_prompt": 1,
        "eval.bootstrap": 10, "eval.agreement_groups": 0,
        "variants": "[str]", "tracking.wandb": "disabled",
    }
    args = ["run", str(CONFIG)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    started = time.perf_counter()
    assert cli_main(args) == 0
    seconds = time.perf_counter() - started
    run = tmp_path / "runs" / "smol-e2e"
    stages = {stage: json.loads((run / stage / "DONE.json").read_text())
              for stage in ("sft", "sample", "reward", "ppo", "eval")}
    print(json.dumps({"total_s": round(seconds, 1),
                      **{s: round(v["stage_seconds"], 1) for s, v in stages.items()}}))

    tokenizer = load_tokenizer(run / "sft" / "model")
    assert "<a>" not in tokenizer.get_vocab() and tokenizer.chat_template  # chat prompts, no markers
    assert stages["sft"]["runs"][stages["sft"]["method"]]["steps"] == 2
    groups = [json.loads(line) for line in (run / "sample" / "ranked.jsonl").read_text().splitlines()]
    assert len(groups) == 4 and all(len(g["responses"]) == 2 for g in groups)
    for group in groups:  # the prompts every stage read: SmolLM2's template, fitted to 96 tokens
        assert group["prompt"].startswith("<|im_start|>system\n") and "\n\nQuestion: " in group["prompt"]
        assert group["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert len(tokenizer(group["prompt"])["input_ids"]) <= 96
    rows = [json.loads(line) for line in (run / "ppo" / "str" / "log.jsonl").read_text().splitlines()]
    # LoRA starts as the reference (float noise only: the sampler's cached forward against a full one)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-3)
    report = json.loads((run / "eval" / "report.json").read_text())
    assert {"original", "sft", "str"} <= set(report["rows"])
    generations = [json.loads(line) for line in (run / "eval" / "generations_str.jsonl").read_text().splitlines()]
    assert len(generations) == 4 and all("<|im_end|>" not in g["generation"] for g in generations)
    assert all(g["prompt"].endswith("<|im_start|>assistant\n") for g in generations)
