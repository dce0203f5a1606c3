"""Scale switches: activation checkpointing, the attention kernel, PPO's learning-rate schedule, and
answer lengths beyond the paper's 100 tokens."""
from __future__ import annotations

import math
import signal

import pytest
import torch

from selfrank.errors import UserError
from selfrank.train import dist, signals
from selfrank.train.checkpoint import CheckpointError, read_state
from selfrank.train.config import ModelConfig, SampleConfig, SFTConfig
from selfrank.train.data.synthetic import make_task
from selfrank.train.models.policy_value import PolicyAndValue
from selfrank.train.models.reward_model import RewardModel
from selfrank.train.models.value_model import ValueModel
from selfrank.train.optim import lr_factor
from selfrank.train.sampling.generation import generate
from selfrank.train.scale import activation_checkpointing_off, apply_model_switches, hf_models
from selfrank.train.stages import sft

from tests.train.helpers import TINY_MODEL, tiny_config, tiny_policy


# ---- activation checkpointing ----------------------------------------------------------------------
def _sft_step(tmp_path, name: str, checkpointing: bool) -> tuple[list[int], dict, dict]:
    """One SFT step; the calls of the first block's attention, the summary and the trained weights."""
    cfg = tiny_config(tmp_path, model=ModelConfig(name="tiny", tiny=TINY_MODEL, gradient_checkpointing=checkpointing),
                      sft=SFTConfig(lr=1e-3, batch_size=8, max_steps=1, block_size=64))
    data = make_task(cfg.task.synthetic, cfg.task.prompt)
    model, tokenizer = tiny_policy(seed=0)
    calls = []
    # A pre-hook: the recomputation stops as soon as it has what the backward needs, before the block's end.
    hook = model.transformer.h[0].attn.register_forward_pre_hook(lambda m, args: calls.append(1))
    summary = sft.train_sft(cfg, data, model, tokenizer, "full", tmp_path / name)
    hook.remove()
    return calls, summary, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_checkpointing_recomputes_blocks_and_trains_alike(tmp_path):
    plain_calls, plain, plain_weights = _sft_step(tmp_path, "plain", False)
    ckpt_calls, ckpt, ckpt_weights = _sft_step(tmp_path, "ckpt", True)
    # Without checkpointing the block runs once; with it, once without keeping its activations and once
    # more in the backward pass to recompute them.
    assert len(plain_calls) == 1 and len(ckpt_calls) == 2
    assert ckpt["loss_first"] == pytest.approx(plain["loss_first"], rel=1e-6)
    for key, value in plain_weights.items():
        torch.testing.assert_close(ckpt_weights[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_checkpointing_is_set_on_every_trained_network_and_off_while_generating(tmp_path):
    model, tokenizer = tiny_policy(seed=0)
    rm = RewardModel.from_causal_lm(tiny_policy(seed=1)[0], tokenizer=tokenizer)
    pv = PolicyAndValue(model, ValueModel.from_reward_model(rm))
    apply_model_switches(pv, ModelConfig(gradient_checkpointing=True))
    networks = hf_models(pv)
    assert len(networks) == 2 and all(m.is_activation_checkpointing for m in networks)  # actor and critic backbone
    pv.train()
    with activation_checkpointing_off(pv):
        assert not any(m.is_activation_checkpointing for m in networks)
        out = generate(pv.policy, tokenizer, ["<q> anna <a>"], do_sample=False, max_new_tokens=4)
    assert len(out.texts) == 1
    assert all(m.is_activation_checkpointing for m in networks)  # back on for training
    acc = dist.get_accelerator()
    with dist.gathered_for_generation(pv, acc) as inner:  # the placement layer does the same
        assert inner is pv and not any(m.is_activation_checkpointing for m in networks)
    assert all(m.is_activation_checkpointing for m in networks)


# ---- attention kernel ---------------------------------------------------------------------------
def test_attention_implementations_compute_the_same_function(tmp_path):
    model, tokenizer = tiny_policy(seed=0)
    model.eval()
    ids = torch.tensor([tokenizer("<q> what does anna have ? <a> a red ball")["input_ids"]])
    outputs = {}
    for kind in ("sdpa", "eager"):
        apply_model_switches(model, ModelConfig(attn_implementation=kind))
        assert model.config._attn_implementation == kind
        with torch.no_grad():
            outputs[kind] = model(input_ids=ids).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-4, atol=1e-5)


def test_flash_attention_is_refused_in_one_line_where_it_cannot_run():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attn and a GPU are here: nothing to refuse")
    model, _ = tiny_policy(seed=0)
    with pytest.raises(UserError, match=r"^model.attn_implementation: flash_attention_2 needs"):
        apply_model_switches(model, ModelConfig(attn_implementation="flash_attention_2"))
    assert model.config._attn_implementation == "sdpa"  # untouched


# ---- PPO learning-rate schedule ----------------------------------------------------------------
def test_lr_factor_by_hand():
    assert [lr_factor(s, 10) for s in (1, 5, 10)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, "constant", 4) for s in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    # Linear: warm-up 2 steps, then 1 - (step - 1 - 2) / 8 over steps 3..10 (the last step still learns).
    assert [lr_factor(s, 10, "linear", 2) for s in (1, 2, 3, 4, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.125])
    assert lr_factor(6, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lr_factor(1, 10, "cosine") == 1.0 and 0 < lr_factor(10, 10, "cosine") < 0.03


@pytest.fixture(scope="module")
def ppo_world(tmp_path_factory):
    from tests.train.test_ppo import build_world

    return build_world(tmp_path_factory.mktemp("ppo_schedule"))


def test_ppo_cosine_schedule_is_logged_and_resumes_exactly(ppo_world, tmp_path, monkeypatch):
    from tests.train.test_ppo import PROMPTS, read_log, tiny_config as ppo_config
    import selfrank.train.stages.ppo as ppo_module
    from selfrank.train.models.causal_lm import load_model
    from selfrank.train.stages.ppo import train_ppo

    config = ppo_config(steps=4, lr_schedule="cosine", warmup_steps=1, save_every=10)
    train_ppo(config, PROMPTS, ppo_world["sft"], ppo_world["rm"], tmp_path / "full")
    rows = read_log(tmp_path / "full")
    expected = [config.ppo.lr * lr_factor(s, 4, "cosine", 1) for s in (1, 2, 3, 4)]
    assert [r["lr/actor"] for r in rows] == pytest.approx(expected)
    assert expected[1] > expected[2] > expected[3] > 0

    # Stopped (as by a preemption signal) after step 2, then resumed: the same weights as uninterrupted.
    original_update, calls = ppo_module.ppo_update, []

    def update_then_stop(*args, **kwargs):
        result = original_update(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            monkeypatch.setattr(signals, "_received", signal.SIGUSR1)
        return result

    monkeypatch.setattr(ppo_module, "ppo_update", update_then_stop)
    with pytest.raises(signals.Preempted):
        train_ppo(config, PROMPTS, ppo_world["sft"], ppo_world["rm"], tmp_path / "cut")
    monkeypatch.undo()
    signals.reset()
    assert read_state(tmp_path / "cut" / "checkpoint")["step"] == 2
    train_ppo(config, PROMPTS, ppo_world["sft"], ppo_world["rm"], tmp_path / "cut", resume=True)
    assert [r["lr/actor"] for r in read_log(tmp_path / "cut")] == pytest.approx(expected)
    a, _ = load_model(tmp_path / "full" / "actor")
    b, _ = load_model(tmp_path / "cut" / "actor")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name

    # A decaying schedule spans ppo.steps: resuming with another number of steps is refused.
    longer = ppo_config(steps=6, lr_schedule="cosine", warmup_steps=1, save_every=10)
    with pytest.raises(CheckpointError, match="other PPO settings"):
        train_ppo(longer, PROMPTS, ppo_world["sft"], ppo_world["rm"], tmp_path / "full", resume=True)


# ---- answer length --------------------------------------------------------------------------------
def test_answers_longer_than_the_papers_100_tokens_fit_the_context_or_are_refused(tmp_path):
    assert SampleConfig(max_new_tokens=150).max_new_tokens == 150  # the paper's "< 100" is the default, not a cap
    assert tiny_config(tmp_path, sample=SampleConfig(max_new_tokens=120)).sample.max_new_tokens == 120
    assert TINY_MODEL.n_positions == 128
    with pytest.raises(UserError, match=r"^sample.max_new_tokens: 150 leaves no room for the prompt in the 128-token"):
        tiny_config(tmp_path, sample=SampleConfig(max_new_tokens=150))
    # A long answer in a model with room for it: the prompt keeps its newest tokens and the answer runs on.
    model, tokenizer = tiny_policy(seed=0)
    long_prompt = " ".join(["<q> what does anna have ?"] * 20) + " <a>"
    out = generate(model, tokenizer, [long_prompt], do_sample=False, max_new_tokens=110)
    assert out.query_ids.shape[1] <= 128 - 110
    assert out.query_ids.shape[1] + out.response_ids.shape[1] <= 128
