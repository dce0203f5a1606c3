"""Shared builders for train tests: a test-sized config and a tiny policy with a tokenizer trained on the fly."""
from __future__ import annotations

from pathlib import Path

from selfrank.ranking.config import EmbedderConfig, RankingConfig
from selfrank.train.config import (EvalConfig, ExperimentConfig, ModelConfig, PPOConfig, RewardConfig, SampleConfig,
                          SFTConfig, SyntheticTaskConfig, TaskConfig, TinyModelConfig)
from selfrank.train.data.prompts import prompt_markers
from selfrank.train.models.causal_lm import build_tiny_model, save_model, train_bpe_tokenizer
from selfrank.train.data.synthetic import make_task

TINY_MODEL = TinyModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=400)


def tiny_config(tmp_path: Path | None = None, name: str = "test", **overrides) -> ExperimentConfig:
    """An ExperimentConfig sized for CPU tests (synthetic task, tiny model, a few steps per stage).

    ``overrides`` replace whole sections, e.g. ``tiny_config(tmp_path, sft=SFTConfig(method="lora"))``.
    """
    sections = dict(
        task=TaskConfig(kind="synthetic", synthetic=SyntheticTaskConfig(n_train=64, n_validation=16, n_test=16)),
        model=ModelConfig(name="tiny", tiny=TINY_MODEL),
        sft=SFTConfig(lr=1e-3, batch_size=8, max_steps=6, block_size=64, save_every=3),
        sample=SampleConfig(samples_per_prompt=4, max_new_tokens=8, max_prompts=8, batch_size=4, async_ranking=False),
        ranking=RankingConfig(embedder=EmbedderConfig(name="lexical", lexical_dim=256)),
        reward=RewardConfig(batch_size=4, max_steps=4, max_length=64),
        ppo=PPOConfig(steps=2, batch_size=4, minibatches=2, ppo_epochs=1, max_new_tokens=8, save_every=1),
        eval=EvalConfig(max_examples=8, max_new_tokens=8, batch_size=8, bootstrap=20, agreement_groups=2),
    )
    sections.update(overrides)
    return ExperimentConfig(name=name, seed=0, output_dir=str(tmp_path or "runs"), **sections)


def tiny_texts(config: ExperimentConfig | None = None) -> list[str]:
    """Training text of the (tiny) synthetic task, for the tokenizer."""
    config = config or tiny_config()
    data = make_task(config.task.synthetic, config.task.prompt)
    return [f"{ex.prompt} {ex.target}" for ex in data.train]


def tiny_tokenizer(config: ExperimentConfig | None = None):
    config = config or tiny_config()
    return train_bpe_tokenizer(tiny_texts(config), config.model.tiny.vocab_size, prompt_markers(config.task.prompt))


def tiny_policy(tmp_path: Path | None = None, config: ExperimentConfig | None = None, seed: int = 0):
    """``(model, tokenizer)``: a randomly initialised tiny GPT-2 (seeded) and its BPE tokenizer.

    With ``tmp_path`` the pair is also saved to ``tmp_path / "policy"`` (a plain model folder).
    """
    import torch

    config = config or tiny_config(tmp_path)
    tokenizer = tiny_tokenizer(config)
    torch.manual_seed(seed)
    model = build_tiny_model(config.model.tiny, tokenizer)
    if tmp_path is not None:
        save_model(model, tokenizer, Path(tmp_path) / "policy")
    return model, tokenizer


TINY_LLAMA = TinyModelConfig(architecture="llama", n_layer=2, n_embd=32, n_head=4, n_positions=128, vocab_size=400)


def tiny_chat_config(tmp_path: Path | None = None, name: str = "test", **overrides) -> ExperimentConfig:
    """:func:`tiny_config` with chat prompts (a ChatML tokenizer) and a tiny Llama policy: the shape of
    the pre-trained SmolLM2 path at test size."""
    import dataclasses

    from selfrank.train.config import PromptFormat

    base = tiny_config(tmp_path, name)
    sections = dict(
        task=dataclasses.replace(base.task, prompt=PromptFormat(style="chat", qa_instruction="Answer.")),
        model=ModelConfig(name="tiny", tiny=TINY_LLAMA),
        sft=dataclasses.replace(base.sft, block_size=96),
        reward=dataclasses.replace(base.reward, max_length=96),
    )
    sections.update(overrides)
    return dataclasses.replace(base, **sections)


def tiny_chat_policy(tmp_path: Path | None = None, config: ExperimentConfig | None = None, seed: int = 0):
    """``(model, tokenizer)`` for chat prompts: a seeded tiny Llama (``config.model.tiny``) and a ChatML
    tokenizer trained on the task's text; saved to ``tmp_path / "policy"`` when given."""
    import torch

    from selfrank.train.data.prompts import tokenizer_texts

    config = config or tiny_chat_config(tmp_path)
    data = make_task(config.task.synthetic, config.task.prompt)
    tokenizer = train_bpe_tokenizer(tokenizer_texts(data, config.task.prompt), config.model.tiny.vocab_size, chat=True)
    torch.manual_seed(seed)
    model = build_tiny_model(config.model.tiny, tokenizer)
    if tmp_path is not None:
        save_model(model, tokenizer, Path(tmp_path) / "policy")
    return model, tokenizer


def signal_during_ppo_update(monkeypatch, signum: int, update: int = 2) -> None:
    """Deliver ``signum`` to this process as PPO's ``update``-th update returns (so while that step is
    still running: the stop lands at its end, after its update)."""
    import os

    import selfrank.train.stages.ppo as ppo_stage

    real_update, calls = ppo_stage.ppo_update, []

    def update_then_signal(*args, **kwargs):
        result = real_update(*args, **kwargs)
        calls.append(1)
        if len(calls) == update:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(ppo_stage, "ppo_update", update_then_signal)
