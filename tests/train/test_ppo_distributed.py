"""PPO on 2 real processes (gloo DDP and DeepSpeed ZeRO-3 on CPU) against one process.

Sampling is seeded per answer (position in the global batch), so the rollouts of a 1-process and a
2-process run are the same episodes, and the whole trajectory must agree up to float summation order:
per-step policy/value losses, reward mean and KL (the adaptive KL controller is on, so a wrong global
KL would show in later steps). The DDP run stops after 2 steps and resumes on 2 processes for the 3rd.
Under DeepSpeed the engine clips the joint actor+critic gradient, so that comparison turns clipping off
on both sides; the DDP one keeps the default per-network clipping at 1.0.

Measured (3 steps, 2 PPO epochs x 2 minibatches): DDP vs 1 process <= 1e-6 relative (KL of step 2:
6.5e-5 relative on a value of 1.8e-3, i.e. 1.2e-7 absolute); ZeRO-3 vs 1 process <= 8e-6 relative.
Tolerance: 1e-4 relative or 1e-6 absolute.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.train.test_distributed import ACCELERATE, DS_CONFIG, finish, free_port, start, worker_env
from tests.train.test_ppo import PROMPTS, build_world
from selfrank.train.models.causal_lm import load_model
from selfrank.train.models.reward_model import encode_pairs, pad_batch
from selfrank.train.models.value_model import ValueModel

WORKER = Path(__file__).resolve().parent / "dist_scripts" / "ppo_train.py"
PPO = dict(steps=3, batch_size=4, samples_per_prompt=2, max_new_tokens=8, ppo_epochs=2, minibatches=2, lr=1e-3,
           critic_lr=1e-3, save_every=2, adaptive_kl=True, target_kl=0.5, kl_horizon=100)
KEYS = ("loss/policy", "loss/value", "reward/mean", "objective/kl", "objective/kl_coef", "objective/entropy")
RTOL, ATOL = 1e-4, 1e-6


def command(kind: str, world: dict, out: Path, ppo: dict, *extra: str) -> tuple[list[str], dict]:
    args = [str(WORKER), "--sft", str(world["sft"]), "--rm", str(world["rm"]), "--prompts", str(world["prompts"]),
            "--out", str(out), "--ppo", json.dumps(ppo), *extra]
    if kind == "single":
        return [sys.executable, *args], worker_env()
    common = [ACCELERATE, "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if kind == "ddp":
        return [*common[:2], "--multi_gpu", *common[2:], *args], worker_env(ACCELERATE_USE_CPU="1")
    return [*common[:2], "--use_deepspeed", "--deepspeed_config_file", str(world["ds_config"]), *common[2:], *args], \
        worker_env()


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ppo_dist")
    torch.set_num_threads(1)
    world = build_world(root)
    world["prompts"] = root / "prompts.json"
    world["prompts"].write_text(json.dumps(PROMPTS))
    world["ds_config"] = root / "ds.json"
    world["ds_config"].write_text(json.dumps(DS_CONFIG))
    no_clip = {**PPO, "max_grad_norm": 0.0}
    # ZeRO-3: reference and reward model as ZeRO-3 inference engines, the reference offloaded.
    zero3 = {**no_clip, "offload_reference": True}
    # LoRA under ZeRO-3: adapters train, the reference is the actor with its adapters off.
    lora = {**no_clip, "policy": "lora", "lora_r": 4}
    jobs = {"single": ("single", PPO), "single_noclip": ("single", no_clip), "ddp": ("ddp", {**PPO, "steps": 2}),
            "zero3": ("zero3", zero3), "single_lora": ("single", lora), "zero3_lora": ("zero3", lora)}
    # The pre-trained SmolLM2's architecture (Llama: grouped key/value heads, tied embeddings, no biases)
    # in its own world: the whole policy sharded by ZeRO-3 on 2 processes against one process.
    llama = build_world(root / "llama", architecture="llama")
    llama.update(prompts=world["prompts"], ds_config=world["ds_config"])
    llama_jobs = {"llama/single": ("single", no_clip), "llama/zero3": ("zero3", no_clip)}
    # All at once: most of their time is start-up (imports, rendezvous, DeepSpeed), not compute.
    procs = {name: start(*command(kind, world, root / name, ppo), root / f"{name}.log")[0]
             for name, (kind, ppo) in jobs.items()}
    procs |= {name: start(*command(kind, llama, root / name, ppo), root / f"{name.replace('/', '_')}.log")[0]
              for name, (kind, ppo) in llama_jobs.items()}
    for name, proc in procs.items():
        finish(proc, root / f"{name.replace('/', '_')}.log", 300)
    # The DDP run resumes its step-2 checkpoint on 2 processes and does step 3.
    finish(start(*command("ddp", world, root / "ddp", PPO, "--resume"), root / "ddp_resume.log")[0],
           root / "ddp_resume.log", 300)
    return {name: root / name for name in [*jobs, *llama_jobs]} | {"world": world}


def assert_same_trajectory(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=ATOL), (a["step"], key, a[key], b[key])
        assert b["episodes"] == a["episodes"]


def assert_same_models(folder_a: Path, folder_b: Path) -> None:
    """The saved actor and critic of run b (2 processes), loaded in this one process, compute what run
    a's do. Outputs, not weights: the attention key biases get no gradient (softmax ignores them) and
    AdamW turns their float-noise gradients into lr-sized steps that differ between runs (measured
    2e-4) while changing no output (measured logits <= 2.1e-6, values <= 1e-6 apart)."""
    actor_a, tokenizer = load_model(folder_a / "actor")
    actor_b, _ = load_model(folder_b / "actor")
    critic_a = ValueModel.from_pretrained(folder_a / "critic")
    critic_b = ValueModel.from_pretrained(folder_b / "critic")
    sft, _ = load_model(folder_a.parent / "sft")
    ids, mask = pad_batch(encode_pairs(tokenizer, PROMPTS, ["red blue yes", "cat", "sun moon tree"] * 4, 64),
                          tokenizer.pad_token_id)
    with torch.no_grad():
        logits_a = actor_a(input_ids=ids, attention_mask=mask).logits
        logits_b = actor_b(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(logits_b, logits_a, rtol=RTOL, atol=1e-5)
        torch.testing.assert_close(critic_b(ids, mask), critic_a(ids, mask), rtol=RTOL, atol=1e-5)
        # The runs trained: the agreement is not that of two untouched copies.
        assert (logits_a - sft(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3


@pytest.mark.slow
def test_ddp_two_processes_with_resume_follow_the_one_process_trajectory(runs):
    info = json.loads((runs["ddp"] / "run.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"] == "DistributedType.MULTI_CPU"
    assert info["summary"]["steps"] == 3 and info["summary"]["episodes"] == 3 * 8
    one, two = read_log(runs["single"]), read_log(runs["ddp"])
    assert_same_trajectory(one, two)  # one row per step: only rank 0 writes the log
    assert one[-1]["objective/kl_coef"] != 0.5  # the adaptive controller moved (from the global KL)
    assert_same_models(runs["single"], runs["ddp"])


@pytest.mark.slow
def test_zero3_two_processes_follow_the_one_process_trajectory(runs):
    info = json.loads((runs["zero3"] / "run.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"] == "DistributedType.DEEPSPEED"
    assert info["zero_stage"] == 3 and len(info["peak_rss_bytes"]) == 2
    assert_same_trajectory(read_log(runs["single_noclip"]), read_log(runs["zero3"]))
    assert_same_models(runs["single_noclip"], runs["zero3"])
    # The checkpoint holds the full (gathered) weights: they load strictly into a plain model and
    # compute what the saved final actor computes (the last checkpoint is taken after the last step).
    from safetensors.torch import load_model as load_safetensors

    plain, tokenizer = load_model(runs["zero3"] / "actor")
    fresh, _ = load_model(runs["world"]["sft"])
    load_safetensors(fresh, str(runs["zero3"] / "checkpoint" / "actor.safetensors"))
    ids, mask = pad_batch(encode_pairs(tokenizer, PROMPTS, ["yes"] * len(PROMPTS), 64), tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits,
                                   plain(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_zero3_lora_policy_follows_the_one_process_trajectory(runs):
    info = json.loads((runs["zero3_lora"] / "run.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    one, two = read_log(runs["single_lora"]), read_log(runs["zero3_lora"])
    assert_same_trajectory(one, two)
    assert one[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the reference
    assert_same_models(runs["single_lora"], runs["zero3_lora"])  # saved merged, loadable in one process


@pytest.mark.slow
def test_zero3_llama_policy_follows_the_one_process_trajectory(runs):
    info = json.loads((runs["llama/zero3"] / "run.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    assert_same_trajectory(read_log(runs["llama/single"]), read_log(runs["llama/zero3"]))
    assert_same_models(runs["llama/single"], runs["llama/zero3"])  # sft: the llama world's own
    actor, _ = load_model(runs["llama/zero3"] / "actor")
    assert type(actor).__name__ == "LlamaForCausalLM"
