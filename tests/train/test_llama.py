"""The Llama architecture (the pre-trained SmolLM2's) at test size, with chat prompts: each SFT method
trains only its own parameters and its folder reloads to the trained model; BitFit gives the bias-free
architecture zero biases; PPO with a LoRA policy trains adapters only, its reference being the actor
with adapters off."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from selfrank.errors import UserError
from selfrank.train.data.prompts import format_task
from selfrank.train.data.synthetic import make_task
from selfrank.train.models import peft_methods
from selfrank.train.models.causal_lm import load_model, stop_token_ids
from selfrank.train.sampling.generation import generate
from selfrank.train.stages import sft
from selfrank.train.stages.ppo import train_ppo

from tests.train.helpers import tiny_chat_config, tiny_chat_policy
from tests.train.test_ppo import PROMPTS, build_world, read_log
from tests.train.test_ppo import tiny_config as ppo_config

LR = {"full": 3e-3, "lora": 1e-2, "bitfit": 3e-2, "adapter": 3e-2}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("method", ["full", "lora", "bitfit", "adapter"])
def test_sft_method_on_llama_touches_only_its_parameters_and_reloads(tmp_path, method):
    config = tiny_chat_config(tmp_path)
    config.sft = dataclasses.replace(config.sft, method=method, lr=LR[method], max_steps=8)
    data = make_task(config.task.synthetic, config.task.prompt)
    model, tokenizer = tiny_chat_policy(tmp_path, config)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    before = _weights(tmp_path / "policy")
    summary = sft.train_sft(config, data, model, tokenizer, method, tmp_path / "out")
    assert summary["loss_final"] < summary["loss_first"] - 0.1
    folder = tmp_path / "out" / "model"
    after = _weights(folder)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if method == "full":
        assert set(after) == set(before) and summary["trainable_params"] == summary["total_params"]
    elif method == "lora":
        assert set(after) == set(before)
        assert changed and all(k.endswith(".weight") and k.split(".")[-2] in PROJECTIONS for k in changed)
    elif method == "bitfit":
        added = set(after) - set(before)
        # Zero biases on every projection the config flags govern; nothing else moved.
        assert not changed and added and all(k.endswith(".bias") and k.split(".")[-2] in PROJECTIONS for k in added)
        assert len(added) == len(PROJECTIONS) * config.model.tiny.n_layer
        assert summary["trainable_params"] == sum(after[k].numel() for k in added)
        assert all(after[k].abs().sum() > 0 for k in added)
    elif method == "adapter":
        assert set(after) == set(before) and not changed
        assert (folder / "adapters.safetensors").is_file()
    loaded, ltok = load_model(folder)
    if method == "bitfit":
        assert loaded.config.attention_bias and loaded.config.mlp_bias  # saved config flags
    prompt = format_task(data, ltok, config).train[0].prompt
    x = torch.tensor([ltok(prompt + data.train[0].target)["input_ids"]])
    base, _ = load_model(tmp_path / "policy")
    with torch.no_grad():
        assert not torch.allclose(loaded(x).logits, base(x).logits)
        if method != "lora":  # LoRA's in-memory model was merged in place by save
            model.eval()
            torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_bitfit_biases_start_at_zero_and_change_nothing(tmp_path):
    model, tokenizer = tiny_chat_policy(config=tiny_chat_config(tmp_path))
    x = torch.tensor([tokenizer("ann has a cat")["input_ids"]])
    model.eval()
    with torch.no_grad():
        before = model(x).logits
        peft_methods.prepare(model, "bitfit", tiny_chat_config().sft)
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(".bias") for name in trainable)


def test_bitfit_refused_for_an_architecture_without_bias_switches():
    from transformers import GPTNeoXConfig, MistralConfig

    peft_methods.check_bitfit(GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                            intermediate_size=64, vocab_size=300), "neox")  # has biases
    with pytest.raises(UserError, match="bitfit"):
        peft_methods.check_bitfit(MistralConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                num_hidden_layers=1, intermediate_size=64, vocab_size=300), "mistral")


def test_chat_policy_generation_stops_at_the_turn_end(tmp_path):
    config = tiny_chat_config(tmp_path)
    model, tokenizer = tiny_chat_policy(config=config)
    (stop,) = stop_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(stop) == "<|im_end|>" and stop != tokenizer.pad_token_id
    words = tokenizer("ann has", add_special_tokens=False)["input_ids"]
    forced = _Forced([*words, stop, *words])
    gen = generate(model, tokenizer, ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], do_sample=False,
                   max_new_tokens=8, method="repeat", generate_kwargs={"logits_processor": [forced]})
    assert bool(gen.ended[0]) and gen.texts == ["ann has"]
    assert gen.response_ids[0][gen.response_mask[0].bool()].tolist() == [*words, stop]


class _Forced:
    """Makes greedy decoding emit ``tokens`` in order."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.step = 0

    def __call__(self, input_ids, scores):
        scores = torch.full_like(scores, -1e9)
        scores[:, self.tokens[min(self.step, len(self.tokens) - 1)]] = 0.0
        self.step += 1
        return scores


@pytest.fixture(scope="module")
def llama_world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("llama_world"), architecture="llama")


def test_ppo_lora_policy_on_llama_trains_adapters_only(llama_world, tmp_path):
    config = ppo_config(steps=2, policy="lora", lora_r=4)
    summary = train_ppo(config, PROMPTS, llama_world["sft"], llama_world["rm"], tmp_path / "ppo")
    assert summary["steps"] == 2
    rows = read_log(tmp_path / "ppo")
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the actor, adapters off
    before, after = _weights(llama_world["sft"]), _weights(tmp_path / "ppo" / "actor")
    assert set(after) == set(before)  # saved merged: a plain Llama folder
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.split(".")[-2] in PROJECTIONS for k in changed)
    actor, _ = load_model(tmp_path / "ppo" / "actor")
    assert type(actor).__name__ == "LlamaForCausalLM"


@pytest.mark.slow
def test_pipeline_with_a_tiny_llama_and_chat_prompts(tmp_path):
    from selfrank.train.models.causal_lm import load_tokenizer
    from selfrank.train.pipeline import run_pipeline

    config = tiny_chat_config(tmp_path, name="chat-pipe")
    config.variants = ["str"]
    run_pipeline(config)
    run = tmp_path / "chat-pipe"
    tokenizer = load_tokenizer(run / "sft" / "original")
    assert tokenizer.chat_template and "<a>" not in tokenizer.get_vocab()  # a ChatML tokenizer, no markers
    groups = [json.loads(line) for line in (run / "sample" / "ranked.jsonl").read_text().splitlines()]
    assert groups and all(g["prompt"].startswith("<|im_start|>user\nAnswer.\n\nContext: ") for g in groups)
    assert all(g["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n") for g in groups)
    generations = [json.loads(line) for line in (run / "eval" / "generations_str.jsonl").read_text().splitlines()]
    assert len(generations) == config.eval.max_examples
    assert all(g["prompt"].endswith("<|im_start|>assistant\n") for g in generations)
