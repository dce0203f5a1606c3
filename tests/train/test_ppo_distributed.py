"""PPO on 2 real processes (gloo DDP and DeepSpeed ZeRO-3 on CPU) against one process.

Sampling is seeded per answer (position in the global batch), so the rollouts of a 1-process and a
2-process run are the same episodes, and the whole trajectory must agree up to float summation order:
per-step policy/value losses, reward mean and KL (the adaptive KL controller is on, so a wrong global
KL would show in later steps). The DDP, ZeRO-2 and ZeRO-3 runs stop after 2 steps and a second launch
resumes each on 2 processes for the 3rd: under DeepSpeed the 4 optimizer steps of step 3 (AdamW, lr
1e-3) only follow the one-process run if the engine's partitioned optimizer state was checkpointed.
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
from selfrank.train.checkpoint import ENGINE_DIR
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
    return [*common[:2], "--use_deepspeed", "--deepspeed_config_file", str(world[f"ds_{kind}"]), *common[2:],
            *args], worker_env()


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ppo_dist")
    torch.set_num_threads(1)
    world = build_world(root)
    world["prompts"] = root / "prompts.json"
    world["prompts"].write_text(json.dumps(PROMPTS))
    world["ds_zero3"] = root / "ds_zero3.json"
    world["ds_zero3"].write_text(json.dumps(DS_CONFIG))
    world["ds_zero2"] = root / "ds_zero2.json"
    world["ds_zero2"].write_text(json.dumps({**DS_CONFIG, "zero_optimization": {"stage": 2}}))
    no_clip = {**PPO, "max_grad_norm": 0.0}
    # ZeRO-3: reference and reward model as ZeRO-3 inference engines, the reference offloaded.
    zero3 = {**no_clip, "offload_reference": True}
    # LoRA under ZeRO-3: adapters train, the reference is the actor with its adapters off.
    lora = {**no_clip, "policy": "lora", "lora_r": 4}
    jobs = {"single": ("single", PPO), "single_noclip": ("single", no_clip), "ddp": ("ddp", PPO),
            "zero3": ("zero3", zero3), "zero2": ("zero2", no_clip), "single_lora": ("single", lora),
            "zero3_lora": ("zero3", lora), "zero2_bf16": ("zero2", {**no_clip, "steps": 2})}
    cut = ("ddp", "zero3", "zero2")  # stopped after 2 of 3 steps, then resumed by a second launch
    extra = {"zero2_bf16": ("--mixed-precision", "bf16")}  # model.mixed_precision: bf16 under DeepSpeed
    # The pre-trained SmolLM2's architecture (Llama: grouped key/value heads, tied embeddings, no biases)
    # in its own world: the whole policy sharded by ZeRO-3 on 2 processes against one process.
    llama = build_world(root / "llama", architecture="llama")
    llama.update(prompts=world["prompts"], ds_zero3=world["ds_zero3"])
    llama_jobs = {"llama/single": ("single", no_clip), "llama/zero3": ("zero3", no_clip)}
    # All at once: most of their time is start-up (imports, rendezvous, DeepSpeed), not compute.
    procs = {name: start(*command(kind, world, root / name, {**ppo, "steps": 2} if name in cut else ppo,
                                  *extra.get(name, ())), root / f"{name}.log")[0]
             for name, (kind, ppo) in jobs.items()}
    procs |= {name: start(*command(kind, llama, root / name, ppo), root / f"{name.replace('/', '_')}.log")[0]
              for name, (kind, ppo) in llama_jobs.items()}
    for name, proc in procs.items():
        finish(proc, root / f"{name.replace('/', '_')}.log", 600)
    # Each cut run resumes its step-2 checkpoint on 2 processes and does step 3.
    resumes = {name: start(*command(jobs[name][0], world, root / name, jobs[name][1], "--resume"),
                           root / f"{name}_resume.log")[0] for name in cut}
    for name, proc in resumes.items():
        finish(proc, root / f"{name}_resume.log", 600)
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


def assert_resumed(folder: Path, zero_stage: int) -> None:
    """The second launch resumed the step-2 checkpoint (it ran step 3 only) and its own checkpoint holds
    the engine's partitions of both processes under DeepSpeed."""
    info = json.loads((folder / "run.json").read_text())
    assert info["steps_run"] == [3] and info["summary"]["steps"] == 3 and info["summary"]["episodes"] == 3 * 8
    assert info["world_size"] == 2 and info["zero_stage"] == zero_stage
    engine = folder / "checkpoint" / ENGINE_DIR
    if zero_stage == 0:
        assert not engine.exists()
        return
    layout = json.loads((engine / "layout.json").read_text())
    assert layout == {"engines": ["policy_value"], "zero_stage": zero_stage, "processes": 2, "mixed_precision": "no"}
    partitions = sorted(p.name for p in (engine / "policy_value" / "state").glob("*optim_states.pt"))
    assert len(partitions) == 2, partitions
    sums = json.loads((folder / "checkpoint" / "checksums.json").read_text())
    assert all(f"{ENGINE_DIR}/policy_value/state/{name}" in sums for name in partitions)


@pytest.mark.slow
def test_ddp_two_processes_with_resume_follow_the_one_process_trajectory(runs):
    info = json.loads((runs["ddp"] / "run.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"] == "DistributedType.MULTI_CPU"
    assert_resumed(runs["ddp"], 0)
    one, two = read_log(runs["single"]), read_log(runs["ddp"])
    assert_same_trajectory(one, two)  # one row per step: only rank 0 writes the log
    assert one[-1]["objective/kl_coef"] != 0.5  # the adaptive controller moved (from the global KL)
    assert_same_models(runs["single"], runs["ddp"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_killed_and_resumed_follow_the_one_process_trajectory(runs, stage):
    folder = runs[f"zero{stage}"]
    info = json.loads((folder / "run.json").read_text())
    assert info["distributed_type"] == "DistributedType.DEEPSPEED" and len(info["peak_rss_bytes"]) == 2
    assert_resumed(folder, stage)
    assert_same_trajectory(read_log(runs["single_noclip"]), read_log(folder))
    assert_same_models(runs["single_noclip"], folder)


@pytest.mark.slow
def test_zero3_checkpoint_holds_the_full_weights(runs):
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


def test_zero2_bf16_from_model_mixed_precision(runs):
    """``model.mixed_precision: bf16`` switches DeepSpeed's bf16 on (the JSON says nothing about it and the
    launcher says --mixed_precision no): the engine computes in bf16 with float32 master weights in its
    checkpointed partitions, and the frozen reference computes in bf16 too, so the first step's KL between
    the actor and its identical reference is exactly 0."""
    folder = runs["zero2_bf16"]
    info = json.loads((folder / "run.json").read_text())
    assert info["mixed_precision"] == "bf16" and info["zero_stage"] == 2
    assert info["deepspeed_config"]["bf16"] == {"enabled": True}
    rows = read_log(folder)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-7)
    assert all(abs(r["loss/value"]) < 1e3 and r["loss/value"] == r["loss/value"] for r in rows)  # finite
    layout = json.loads((folder / "checkpoint" / ENGINE_DIR / "layout.json").read_text())
    assert layout["mixed_precision"] == "bf16"
    partitions = sorted((folder / "checkpoint" / ENGINE_DIR / "policy_value" / "state").glob("bf16_zero_pp_rank_*"))
    assert len(partitions) == 2
    # The master weights inside a partition are float32 (DeepSpeed keeps them; the module computes in bf16).
    from selfrank.train.dist.engine_state import _deepspeed_safe_globals

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        part = torch.load(partitions[0], weights_only=True)["optimizer_state_dict"]
    masters = part["single_partition_of_fp32_groups"]
    assert masters and all(t.dtype == torch.float32 for t in masters)
    # The saved actor is a plain float32 model.
    actor, _ = load_model(folder / "actor")
    assert next(actor.parameters()).dtype == torch.float32
