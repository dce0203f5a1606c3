"""Precision: ``model.dtype`` (how weights are stored) apart from ``model.mixed_precision`` (how they
compute), one source of truth for accelerate, DeepSpeed and the launcher, and the failure it prevents:
in bfloat16, 0.05 + 3e-5 == 0.05, so small updates of bf16 weights without a float32 master copy are lost."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfrank.errors import UserError
from selfrank.launch.cli import main
from selfrank.train import dist
from selfrank.train.config import ModelConfig, SFTConfig
from selfrank.train.data.synthetic import make_task
from selfrank.train.precision import check_precision_request, deepspeed_json_precision
from selfrank.train.stages import sft

from tests.train.helpers import TINY_MODEL, tiny_config, tiny_policy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def float32_afterwards():
    """Tests here switch this process's Accelerator to bf16; later tests expect float32 again."""
    yield
    dist.get_accelerator(mixed_precision="no")


def test_bfloat16_cannot_hold_a_small_update():
    """The arithmetic behind the setting."""
    w = torch.tensor(0.05, dtype=torch.bfloat16)
    assert w + 3e-5 == w
    assert torch.tensor(0.05) + 3e-5 != torch.tensor(0.05)


def _sft_setup(tmp_path, **model):
    cfg = tiny_config(tmp_path, model=ModelConfig(name="tiny", tiny=TINY_MODEL, **model),
                      sft=SFTConfig(lr=1e-5, batch_size=8, max_steps=1, block_size=64, max_grad_norm=0.0))
    return cfg, make_task(cfg.task.synthetic, cfg.task.prompt)


def test_bf16_mixed_precision_keeps_a_1e5_update_that_bf16_weights_lose(tmp_path):
    cfg, data = _sft_setup(tmp_path, mixed_precision="bf16")
    model, tokenizer = tiny_policy(seed=0)
    computed = []
    hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, out: computed.append(out.dtype))
    sft.train_sft(cfg, data, model, tokenizer, "full", tmp_path / "mixed")
    hook.remove()
    assert computed and set(computed) == {torch.bfloat16}  # the forward ran under bf16 autocast
    weights = load_file(str(tmp_path / "mixed" / "model" / "model.safetensors"))
    norm = weights["transformer.ln_f.weight"]  # starts at exactly 1.0
    assert norm.dtype == torch.float32
    # AdamW's first step moves every weight by about lr: kept by the float32 master weights.
    assert float((norm != 1.0).float().mean()) > 0.9
    assert float((norm - 1.0).abs().max()) < 2e-5

    # The same update applied to bfloat16 weights (what model.dtype: bfloat16 trained before): lost.
    half, _ = tiny_policy(seed=0)
    half = half.to(torch.bfloat16)
    batch = sft.collate(sft.tokenize_examples(data.train[:8], tokenizer, 64), tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(half.parameters(), lr=1e-5, weight_decay=0.0)
    loss, count = sft.answer_token_loss_sum(half, batch)
    (loss / count).backward()
    optimizer.step()
    assert half.transformer.ln_f.weight.grad.abs().min() > 0  # it had a gradient...
    assert torch.equal(half.transformer.ln_f.weight, torch.ones_like(half.transformer.ln_f.weight))  # ...and no effect

    # Training such weights without a master copy is refused, in one line naming the setting.
    cfg16, _ = _sft_setup(tmp_path, dtype="bfloat16")
    with pytest.raises(UserError, match=r"model.dtype: bfloat16 weights would be trained without a float32 master"):
        sft.train_sft(cfg16, data, half, tokenizer, "full", tmp_path / "half")


def test_a_launcher_or_deepspeed_json_that_disagrees_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(UserError, match=r"model.mixed_precision is 'no' but the launcher asks for --mixed_precision bf16"):
        check_precision_request("no")
    check_precision_request("bf16")  # agreeing is fine
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_precision_request("bf16")  # the launcher's default defers to the config

    ds = tmp_path / "ds.json"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    ds.write_text(json.dumps({"bf16": {"enabled": False}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(UserError, match=r"bf16.enabled is false but model.mixed_precision is 'bf16'"):
        check_precision_request("bf16")
    check_precision_request("no")
    ds.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(UserError, match=r"bf16.enabled is true but model.mixed_precision is 'no'"):
        check_precision_request("no")
    # The shipped JSONs leave the choice to the config.
    for shipped in sorted((REPO / "configs" / "deepspeed").glob("*.json")):
        assert deepspeed_json_precision(json.loads(shipped.read_text())) == {}, shipped.name
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(shipped))
        check_precision_request("bf16")
        check_precision_request("no")


def test_fp16_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 is allowed there")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        check_precision_request("fp16")


def test_the_cli_refuses_a_conflicting_launcher_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    (tmp_path / "config.yaml").write_text("name: t\n")
    code = main(["sft", str(tmp_path / "config.yaml")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "model.mixed_precision is 'no' but the launcher asks for --mixed_precision fp16" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_trainable_half_weights_are_refused_outside_deepspeed():
    acc = dist.get_accelerator(mixed_precision="bf16")
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with pytest.raises(UserError, match="model.dtype: bfloat16"):
        dist.prepare_trainable(acc, model, torch.optim.AdamW(model.parameters()))
    # Frozen half weights are fine (nothing is updated), and float32 weights train under autocast.
    frozen = dist.prepare_frozen(torch.nn.Linear(4, 4).to(torch.bfloat16), acc)
    assert frozen(torch.randn(2, 4, dtype=torch.bfloat16)).shape == (2, 4)
    model = torch.nn.Linear(4, 4)
    prepared, _ = dist.prepare_trainable(acc, model, torch.optim.AdamW(model.parameters()))
    assert prepared.weight.dtype == torch.float32


def test_frozen_models_compute_under_the_jobs_autocast():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    plain = layer(x)
    acc = dist.get_accelerator(mixed_precision="bf16")
    frozen = dist.prepare_frozen(layer, acc)
    with acc.autocast():
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias).float()
    out = frozen(x)
    assert out.dtype == torch.float32  # outputs come back in float32, as from the prepared module
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out - plain).abs().max() > 1e-4  # and it did compute in bf16


@pytest.fixture(scope="module")
def ppo_world(tmp_path_factory):
    from tests.train.test_ppo import build_world

    return build_world(tmp_path_factory.mktemp("ppo_bf16"))


@pytest.mark.parametrize("policy", ["full", "lora"])
def test_ppo_under_bf16_reference_and_actor_compute_alike(ppo_world, tmp_path, policy):
    """The reference is a copy of the actor (or the actor with its LoRA adapters off): under bf16 autocast
    both compute in bf16, so the first step's KL is exactly 0, and the update trains the fp32 weights."""
    from tests.train.test_ppo import PROMPTS, read_log, tiny_config as ppo_config
    from selfrank.train.models.causal_lm import load_model
    from selfrank.train.stages.ppo import train_ppo

    config = ppo_config(steps=2, policy=policy, lora_r=4, lr=1e-5, critic_lr=1e-5)
    config = dataclasses.replace(config, model=ModelConfig(mixed_precision="bf16"))
    train_ppo(config, PROMPTS, ppo_world["sft"], ppo_world["rm"], tmp_path / "ppo")
    rows = read_log(tmp_path / "ppo")
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-7), rows[0]["objective/kl"]
    assert all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)
    before, _ = load_model(ppo_world["sft"])
    after, _ = load_model(tmp_path / "ppo" / "actor")
    norm = "transformer.ln_f.weight"
    assert after.state_dict()[norm].dtype == torch.float32
    if policy == "full":  # lr 1e-5 on weights of 1.0: kept (bf16 weights would not move)
        assert not torch.equal(after.state_dict()[norm], before.state_dict()[norm])


def test_whole_pipeline_computes_in_bf16_with_every_switch_on(tmp_path):
    """One process, every stage, bf16 mixed precision with activation checkpointing, eager attention and
    a cosine PPO schedule: every transformer projection computes in bf16 (training, sampling, scoring,
    evaluation), and the saved models are float32."""
    from transformers.pytorch_utils import Conv1D

    from selfrank.train.config import PPOConfig
    from selfrank.train.pipeline import run_pipeline
    from selfrank.train.rundir import RunDir

    config = tiny_config(tmp_path, name="bf16", variants=["str"],
                         model=ModelConfig(name="tiny", tiny=TINY_MODEL, mixed_precision="bf16",
                                           gradient_checkpointing=True, attn_implementation="eager"),
                         ppo=PPOConfig(steps=3, batch_size=4, minibatches=2, ppo_epochs=1, max_new_tokens=8,
                                       save_every=1, lr_schedule="cosine"))
    dtypes = set()

    def record(module, args, output):
        if isinstance(module, Conv1D):
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run_pipeline(config)
    finally:
        handle.remove()
    assert dtypes == {torch.bfloat16}
    run = RunDir(tmp_path / "bf16")
    assert run.is_done("eval")
    rows = [json.loads(line) for line in (run.root / "ppo" / "str" / "log.jsonl").read_text().splitlines()]
    assert [r["lr/actor"] for r in rows] == sorted((r["lr/actor"] for r in rows), reverse=True)
    assert load_file(str(run.root / "ppo" / "str" / "actor" / "model.safetensors"))["transformer.ln_f.weight"].dtype \
        == torch.float32
