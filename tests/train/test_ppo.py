"""The PPO loop on tiny real models: learning, exact resume, NaN handling, missing-EOS penalty."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from selfrank.train.config import ExperimentConfig, PPOConfig, TinyModelConfig
from selfrank.train.sampling.generation import generate
from selfrank.train.models.causal_lm import build_tiny_model, load_model, save_model, train_bpe_tokenizer
from selfrank.train.models.policy_value import PolicyAndValue
from selfrank.train.rl.rollout import collect_rollout, row_seeds
from selfrank.train.stages.ppo import NonFiniteError, train_ppo
from selfrank.train.checkpoint import read_state
from selfrank.train.rl.reward_losses import pairwise_loss
from selfrank.train.models.reward_model import RewardModel, encode_pairs, pad_batch
from selfrank.train.models.value_model import ValueModel
from tests.train.helpers import signal_during_ppo_update

WORDS = "red blue green cat dog sun moon tree river stone bird fish".split()
GOOD = "yes"  # the reward model is trained to like answers full of this word
PROMPTS = [f"<q> {a} {b} <a>" for a, b in zip(WORDS, WORDS[3:] + WORDS[:3])]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _texts():
    return [f"{p} {' '.join(WORDS[i:i + 4])} {GOOD} no" for i, p in enumerate(PROMPTS)] * 4


def build_world(root, architecture: str = "gpt2") -> dict:
    """A tiny SFT policy and a reward model trained (pairwise loss) to prefer answers made of "good"
    tokens (even ids) over answers made of "bad" ones (odd ids): a dense preference, so a random policy's
    samples already differ in reward and PPO has something to climb. Deterministic (seeded).
    ``architecture``: the tiny policy's (``gpt2`` or ``llama``)."""
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(_texts(), vocab_size=300, extra_tokens=("<q>", "<a>"))
    model = build_tiny_model(TinyModelConfig(architecture=architecture, n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                             vocab_size=300), tokenizer)
    sft = root / "sft"
    save_model(model, tokenizer, sft)

    rm = RewardModel.from_causal_lm(sft)
    special = set(tokenizer.all_special_ids)
    good = torch.tensor([i for i in range(len(tokenizer)) if i % 2 == 0 and i not in special])
    bad = torch.tensor([i for i in range(len(tokenizer)) if i % 2 == 1 and i not in special])
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    gen = torch.Generator().manual_seed(1)

    def batch(n: int):
        rows = []
        for kind in ("winner", "loser"):
            for i in range(n):
                length = 2 + (i % 7)
                # Winners are mostly good tokens, losers mostly bad ones (80/20), so partial credit exists.
                share = 0.8 if kind == "winner" else 0.2
                pick_good = torch.rand(length, generator=gen) < share
                ids = torch.where(pick_good, good[torch.randint(len(good), (length,), generator=gen)],
                                  bad[torch.randint(len(bad), (length,), generator=gen)])
                end = [tokenizer.eos_token_id] if i % 2 else []
                rows.append(prompt_ids[i % len(PROMPTS)] + ids.tolist() + end)
        return pad_batch(rows, tokenizer.pad_token_id)

    optimizer = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for _ in range(80):
        ids, mask = batch(16)
        rewards = rm(ids, mask)
        loss = pairwise_loss(rewards[:16], rewards[16:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        ids, mask = batch(64)
        rewards = rm(ids, mask)
    accuracy = float((rewards[:64] > rewards[64:]).float().mean())
    assert accuracy > 0.8, f"the test reward model did not learn its preference (accuracy {accuracy})"
    rm.eval()
    rm_folder = root / "rm"
    rm.save_pretrained(rm_folder)
    return {"root": root, "sft": sft, "rm": rm_folder}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("ppo_world"))


def tiny_config(**ppo) -> ExperimentConfig:
    settings = dict(steps=4, batch_size=4, samples_per_prompt=2, max_new_tokens=8, ppo_epochs=2, minibatches=2,
                    lr=1e-3, critic_lr=1e-3, save_every=2, missing_eos_penalty=-1.0)
    settings.update(ppo)
    config = ExperimentConfig(seed=3)
    config.ppo = PPOConfig(**settings)
    return config


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_value_model_starts_as_the_normalised_reward(world):
    rm = RewardModel.from_pretrained(world["rm"])
    rm.set_normalizer(2.0, -0.5)
    critic = ValueModel.from_reward_model(rm)
    ids, mask = pad_batch(encode_pairs(rm.tokenizer, PROMPTS[:3], ["yes yes", "cat", "sun moon"], 64),
                          rm.tokenizer.pad_token_id)
    with torch.no_grad():
        values = critic(ids, mask)
        expected = rm.normalized(rm(ids, mask))
    assert values.shape == ids.shape
    torch.testing.assert_close(values[:, -1], expected, atol=1e-5, rtol=1e-5)  # left padding: last = last real
    critic.save_pretrained(world["root"] / "critic_roundtrip")
    again = ValueModel.from_pretrained(world["root"] / "critic_roundtrip")
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask), values)


@pytest.mark.parametrize("source", ["sampling", "forward"])
def test_rollout_logprobs_match_the_update_forward(world, source):
    actor, tokenizer = load_model(world["sft"])
    rm = RewardModel.from_pretrained(world["rm"])
    critic = ValueModel.from_reward_model(rm)
    cfg = PPOConfig(batch_size=2, samples_per_prompt=2, max_new_tokens=6, temperature=0.7, top_p=0.9,
                    rollout_logprobs=source)
    model = PolicyAndValue(actor, critic)
    ro = collect_rollout(model, actor, rm, tokenizer, PROMPTS[:2], cfg, row_seeds(5, 1, 0, 2, 2))
    # The reference here IS the actor, so the KL is exactly 0 and the log-probs are real probabilities.
    torch.testing.assert_close(ro.logp * ro.mask, ro.ref_logp * ro.mask)
    assert bool((ro.logp[ro.mask.bool()] < 0).all())
    # The log-probs are of softmax(logits / T): compare with a plain full forward at T = 0.7.
    with torch.no_grad():
        full = actor(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                     position_ids=(ro.attention_mask.cumsum(1) - 1).clamp(min=0)).logits
    r = ro.response_ids.shape[1]
    expected = torch.log_softmax(full[:, -r - 1:-1] / 0.7, -1).gather(-1, ro.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ro.logp * ro.mask, expected * ro.mask, atol=1e-5, rtol=1e-5)
    # The entropy is that of the whole tempered distribution (not the nucleus), summed over real tokens.
    tempered = torch.log_softmax(full[:, -r - 1:-1] / 0.7, -1)
    entropy = (-(tempered.exp() * tempered).sum(-1) * ro.mask).sum(1)
    torch.testing.assert_close(ro.entropy, entropy, atol=1e-4, rtol=1e-5)
    # Both sources sample the same answers (the draws do not depend on where the log-probs come from).
    other_source = "sampling" if source == "forward" else "forward"
    other = collect_rollout(model, actor, rm, tokenizer, PROMPTS[:2],
                            dataclasses.replace(cfg, rollout_logprobs=other_source), row_seeds(5, 1, 0, 2, 2))
    assert other.texts == ro.texts and torch.equal(other.response_ids, ro.response_ids)
    # The RM score is read on the same ids, and the values are the critic's on the states before each token.
    torch.testing.assert_close(ro.raw_score, rm(ro.input_ids, ro.attention_mask).detach())
    with torch.no_grad():
        values = critic(ro.input_ids[:, :-1], ro.attention_mask[:, :-1])[:, -r:]
    torch.testing.assert_close(ro.values, values)


def test_auto_rollout_logprobs_recompute_under_autocast_or_half_weights(world):
    """``auto`` keeps the sampler's log-probs only when generate and the update compute alike: fp32
    weights and no autocast. (The accelerator stand-in carries the one attribute that is read.)"""
    from types import SimpleNamespace

    from selfrank.train.rl.rollout import logprobs_at_sampling

    actor, _ = load_model(world["sft"])
    model = PolicyAndValue(actor, ValueModel.from_reward_model(RewardModel.from_pretrained(world["rm"])))
    plain, autocast = SimpleNamespace(mixed_precision="no"), SimpleNamespace(mixed_precision="bf16")
    auto = PPOConfig()
    assert logprobs_at_sampling(auto, model, plain)
    assert not logprobs_at_sampling(auto, model, autocast)
    assert logprobs_at_sampling(PPOConfig(rollout_logprobs="sampling"), model, autocast)
    assert not logprobs_at_sampling(PPOConfig(rollout_logprobs="forward"), model, plain)
    actor.to(torch.bfloat16)
    assert not logprobs_at_sampling(auto, model, plain)


def test_row_seeded_sampling_does_not_depend_on_the_batch(world):
    """An answer depends on its own seed only: sampled alone or among other prompts, it is the same,
    and the rows that share a prompt but not a seed differ."""
    actor, tokenizer = load_model(world["sft"])
    rm = RewardModel.from_pretrained(world["rm"])
    model = PolicyAndValue(actor, ValueModel.from_reward_model(rm))
    cfg = PPOConfig(batch_size=4, samples_per_prompt=2, max_new_tokens=8, temperature=1.0)
    together = collect_rollout(model, actor, rm, tokenizer, PROMPTS[:4], cfg, row_seeds(7, 3, 0, 4, 2))
    second_half = collect_rollout(model, actor, rm, tokenizer, PROMPTS[2:4], cfg, row_seeds(7, 3, 2, 4, 2))
    assert together.texts[4:] == second_half.texts
    r = second_half.mask.shape[1]
    torch.testing.assert_close(together.logp[4:, :r] * together.mask[4:, :r], second_half.logp * second_half.mask,
                               atol=1e-5, rtol=1e-5)
    assert len(set(together.texts)) > 2  # distinct seeds give distinct answers (8 rows of random tokens)
    # The sampler draws from softmax(logits / T): each picked token has a positive probability.
    assert bool(torch.isfinite(together.logp[together.mask.bool()]).all())


def test_row_seeded_sampler_draws_from_the_tempered_nucleus():
    """Per-row streams, the frequencies of softmax(logits / T) cut to the top-p nucleus, and greedy
    generate() taking exactly the one token the sampler leaves."""
    from selfrank.train.sampling.row_sampler import RowSeededSampler

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = 4000
    scores = (probs.log() * 0.5).expand(rows, 4).clone()  # logits at T = 0.5 give back probs
    out = RowSeededSampler(list(range(rows)), temperature=0.5, top_p=1.0)(None, scores)
    assert bool((torch.isfinite(out).sum(1) == 1).all())
    freq = torch.bincount(out.argmax(1), minlength=4).float() / rows
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    # top_p = 0.65: the nucleus is {0.4, 0.3} (0.7 >= 0.65), renormalised to 4/7, 3/7.
    sampler = RowSeededSampler(list(range(rows)), temperature=1.0, top_p=0.65)
    nucleus = sampler(None, probs.log().expand(rows, 4).clone())
    freq = torch.bincount(nucleus.argmax(1), minlength=4).float() / rows
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.0, 3 / 7, 4 / 7]), atol=0.03, rtol=0)
    # The same seed gives the same draw whatever the other rows are.
    again = RowSeededSampler([5, 999], temperature=0.5, top_p=1.0)(None, scores[:2].clone())
    assert again[0].argmax() == out[5].argmax()


def test_row_seeded_sampler_uses_each_rows_stream_in_order_across_blocks():
    """Step t of row i uses the t-th uniform of generator seeds[i], also past a block of pre-drawn
    uniforms, and the recorded log-prob is that of the picked token under softmax(logits / T)."""
    from selfrank.train.sampling.row_sampler import RowSeededSampler

    seeds, steps, vocab = [3, 8], RowSeededSampler.BLOCK + 9, 50
    logits = torch.randn(steps, 2, vocab, generator=torch.Generator().manual_seed(0))
    sampler = RowSeededSampler(seeds, temperature=0.7, top_p=1.0, record=True)
    picked = torch.stack([sampler(None, logits[t].clone()).argmax(1) for t in range(steps)], 1)
    for row, seed in enumerate(seeds):
        stream = torch.Generator().manual_seed(seed)
        for t in range(steps):
            cdf = torch.softmax(logits[t, row] / 0.7, -1).cumsum(0)
            u = 1.0 - torch.rand((), generator=stream, dtype=torch.float64)
            expected = int(torch.searchsorted(cdf, (u.float() * cdf[-1]).reshape(1)))
            assert int(picked[row, t]) == expected, (row, t)
    logp, entropy = sampler.recorded(steps)
    tempered = torch.log_softmax(logits / 0.7, -1).transpose(0, 1)  # (rows, steps, vocab)
    torch.testing.assert_close(logp, tempered.gather(-1, picked.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(entropy, -(tempered.exp() * tempered).sum(-1))
    with pytest.raises(RuntimeError):
        sampler.recorded(steps + 1)


def _mean_score(folder, rm_folder, seed=11):
    model, tokenizer = load_model(folder)
    rm = RewardModel.from_pretrained(rm_folder)
    gen = generate(model, tokenizer, PROMPTS, n=4, temperature=0.8, max_new_tokens=8, seed=seed)
    with torch.no_grad():
        ids = torch.cat([gen.query_ids, gen.response_ids], 1)
        mask = torch.cat([gen.query_mask, gen.response_mask], 1)
        return float(rm.normalized(rm(ids, mask)).mean()), gen


def test_ppo_raises_the_reward_with_finite_kl(world, tmp_path):
    config = tiny_config(steps=12, batch_size=6, samples_per_prompt=4, lr=3e-3, kl_coef=0.05,
                         missing_eos_penalty=None)
    summary = train_ppo(config, PROMPTS, world["sft"], world["rm"], tmp_path / "ppo")
    rows = read_log(tmp_path / "ppo")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert summary["steps"] == 12 and summary["episodes"] == 12 * 24 and summary["skipped_steps"] == 0
    for key in ("objective/kl", "objective/kl_coef", "objective/entropy", "reward/mean", "reward/std",
                "objective/rlhf_reward", "loss/policy", "loss/value", "policy/clipfrac", "value/clipfrac",
                "policy/approxkl", "time/step_s", "tokens/s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    final = sum(r["reward/mean"] for r in rows[-3:]) / 3
    assert final > first + 0.3, (first, final)
    assert rows[-1]["objective/kl"] > 0  # the policy moved away from the reference, by a finite amount
    # Same prompts, same sampling seed: the trained actor scores higher than the SFT model.
    before, _ = _mean_score(world["sft"], world["rm"])
    after, _ = _mean_score(tmp_path / "ppo" / "actor", world["rm"])
    assert after > before + 0.3, (before, after)
    assert (tmp_path / "ppo" / "critic" / "value_head.safetensors").is_file()


def test_resume_equals_uninterrupted(world, tmp_path):
    full = tiny_config(steps=4)
    train_ppo(full, PROMPTS, world["sft"], world["rm"], tmp_path / "full")

    part = tiny_config(steps=2)
    train_ppo(part, PROMPTS, world["sft"], world["rm"], tmp_path / "cut")
    # A crash after logging step 3 but before its checkpoint leaves a line the resumed run must redo.
    with open(tmp_path / "cut" / "log.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 3, "reward/mean": 123.0}) + "\n")
    # Disturb the global RNGs: the checkpoint must restore them.
    torch.manual_seed(999)
    summary = train_ppo(full, PROMPTS, world["sft"], world["rm"], tmp_path / "cut", resume=True)
    assert summary["steps"] == 4 and summary["episodes"] == 4 * 8

    a, _ = load_model(tmp_path / "full" / "actor")
    b, _ = load_model(tmp_path / "cut" / "actor")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    ca = ValueModel.from_pretrained(tmp_path / "full" / "critic")
    cb = ValueModel.from_pretrained(tmp_path / "cut" / "critic")
    for (name, x), (_, y) in zip(ca.state_dict().items(), cb.state_dict().items()):
        assert torch.equal(x, y), name
    full_log, cut_log = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut_log] == [1, 2, 3, 4]
    for x, y in zip(full_log, cut_log):
        assert x["reward/mean"] == y["reward/mean"] and x["loss/policy"] == y["loss/policy"]


def _nan_reward_model(world, tmp_path):
    rm = RewardModel.from_pretrained(world["rm"])
    with torch.no_grad():
        rm.head.weight.fill_(float("nan"))
    folder = tmp_path / "nan_rm"
    rm.save_pretrained(folder)
    # The critic starts from this RM too; give it a finite head so only the scores are poisoned.
    return folder


def test_nan_scores_skip_the_step(world, tmp_path):
    folder = _nan_reward_model(world, tmp_path)
    summary = train_ppo(tiny_config(steps=2, nan_policy="skip"), PROMPTS, world["sft"], folder, tmp_path / "ppo")
    assert summary["skipped_steps"] == 2 and summary["steps"] == 2
    rows = read_log(tmp_path / "ppo")
    assert [r["skipped"] for r in rows] == ["reward-model scores"] * 2
    # Nothing was applied: the saved actor equals the SFT model.
    a, _ = load_model(world["sft"])
    b, _ = load_model(tmp_path / "ppo" / "actor")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_nan_scores_stop_with_a_checkpoint(world, tmp_path):
    folder = _nan_reward_model(world, tmp_path)
    with pytest.raises(NonFiniteError, match="non-finite reward-model scores"):
        train_ppo(tiny_config(steps=2, nan_policy="stop"), PROMPTS, world["sft"], folder, tmp_path / "ppo")
    state = read_state(tmp_path / "ppo" / "checkpoint")
    assert state["step"] == 0 and state["cursor"] == 0


def test_missing_eos_penalty_is_applied(world, tmp_path):
    # Two tokens per answer: nearly none ends, so the penalty shows in the logged scores.
    base = dict(steps=1, max_new_tokens=2, batch_size=4, samples_per_prompt=2)
    train_ppo(tiny_config(missing_eos_penalty=-5.0, **base), PROMPTS, world["sft"], world["rm"], tmp_path / "pen")
    train_ppo(tiny_config(missing_eos_penalty=None, **base), PROMPTS, world["sft"], world["rm"], tmp_path / "nopen")
    pen, nopen = read_log(tmp_path / "pen")[0], read_log(tmp_path / "nopen")[0]
    # Same seed, same samples: identical raw scores, and the penalty moves exactly the unfinished ones.
    assert pen["reward/mean"] == nopen["reward/mean"]
    unfinished = 1.0 - pen["eos/ended_frac"]
    assert unfinished > 0
    assert pen["reward/penalized_mean"] == pytest.approx(pen["reward/mean"] - 5.0 * unfinished, abs=1e-5)
    assert nopen["reward/penalized_mean"] == pytest.approx(nopen["reward/mean"], abs=1e-6)


def _lexical_pool():
    from selfrank.ranking.config import RankingConfig
    from selfrank.ranking.pool import RankingPool

    config = RankingConfig()
    config.embedder.name = "lexical"
    pool = RankingPool(config, workers=1)
    pool.wait_ready(timeout=600)
    return pool


def test_online_refresh_trains_the_rm_on_fresh_ranked_pairs_only(world):
    from selfrank.train.rl.online_rm import OnlineRewardRefresher

    rm = RewardModel.from_pretrained(world["rm"])
    config = tiny_config(online_rm_every=1, online_rm_max_staleness=1)
    refresher = OnlineRewardRefresher(rm, rm.tokenizer, config)
    answers = ["cat dog sun", "cat dog moon", "cat dog sun tree", "fish river stone"]
    pool = _lexical_pool()
    try:
        pool.submit("old", PROMPTS[0], answers, policy_version=1)
        pool.submit("new", PROMPTS[1], answers, policy_version=5)
        results = pool.drain(timeout=600)
    finally:
        pool.close()
    assert {r.id for r in results} == {"old", "new"} and all(r.ok for r in results)
    refresher.take(results)
    n_new = len(next(r for r in results if r.id == "new").ranked.pairs)
    n_old = len(next(r for r in results if r.id == "old").ranked.pairs)
    assert n_new > 0
    before = [p.detach().clone() for p in rm.parameters()]
    stats = refresher.refresh(step=6, generator=torch.Generator().manual_seed(0))
    # Version 1 is 5 steps old (> 1): dropped; version 5 is 1 step old: kept.
    assert stats["online_rm/pairs"] == n_new and stats["online_rm/dropped_stale"] == n_old
    assert math.isfinite(stats["online_rm/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, rm.parameters()))
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())


def test_ppo_with_ranking_pool_logs_queue_and_saves_online_rm(world, tmp_path):
    pool = _lexical_pool()
    try:
        config = tiny_config(steps=2, samples_per_prompt=4, minibatches=2, online_rm_every=1)
        summary = train_ppo(config, PROMPTS, world["sft"], world["rm"], tmp_path / "ppo", ranking_pool=pool,
                            online_rm=True)
    finally:
        pool.close()
    rows = read_log(tmp_path / "ppo")
    assert all("ranking/queue_depth" in r and "ranking/latency_s" in r and "online_rm/pairs" in r for r in rows)
    assert summary["ranking_dropped_groups"] == 0
    assert RewardModel.from_pretrained(tmp_path / "ppo" / "reward_model") is not None


def test_preemption_checkpoints_and_resume_equals_uninterrupted(world, tmp_path, monkeypatch):
    """SIGUSR1 (SLURM's warning signal) mid-run: checkpoint the finished steps, raise Preempted; the
    resumed run ends with the uninterrupted run's weights."""
    import signal

    from selfrank.train import signals

    full = tiny_config(steps=3, save_every=10)
    train_ppo(full, PROMPTS, world["sft"], world["rm"], tmp_path / "full")

    signals.install_stop_handlers()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        signal_during_ppo_update(monkeypatch, signal.SIGUSR1, update=2)  # arrives while step 2 trains
        with pytest.raises(signals.Preempted):
            train_ppo(full, PROMPTS, world["sft"], world["rm"], tmp_path / "cut")
        monkeypatch.undo()
    finally:
        signals.reset()
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert [r["step"] for r in read_log(tmp_path / "cut")] == [1, 2]
    train_ppo(full, PROMPTS, world["sft"], world["rm"], tmp_path / "cut", resume=True)
    a, _ = load_model(tmp_path / "full" / "actor")
    b, _ = load_model(tmp_path / "cut" / "actor")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_lora_policy_trains_adapters_only_against_the_adapter_free_reference(world, tmp_path):
    config = tiny_config(steps=3, batch_size=6, samples_per_prompt=2, lr=3e-3, policy="lora", lora_r=4)
    summary = train_ppo(config, PROMPTS, world["sft"], world["rm"], tmp_path / "ppo")
    rows = read_log(tmp_path / "ppo")
    assert summary["steps"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
    # Step 1 samples from the untouched actor: LoRA starts as the identity, so it IS the reference.
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["objective/kl"] != pytest.approx(0.0, abs=1e-6)  # the adapters moved it
    # The saved actor is a plain causal LM (LoRA merged in) that differs from the SFT model.
    actor, _ = load_model(tmp_path / "ppo" / "actor")
    sft, _ = load_model(world["sft"])
    assert not any("lora" in name for name in actor.state_dict())
    deltas = {name: (actor.state_dict()[name] - w).abs().max().item() for name, w in sft.state_dict().items()}
    assert max(deltas.values()) > 1e-4
    # Only linear layers carry adapters: embeddings and layer norms are the SFT model's, exactly.
    assert all(deltas[name] == 0 for name in deltas if "wte" in name or "wpe" in name or ".ln_" in name)


def test_adapter_disabled_view_computes_the_base_model(world):
    from selfrank.train.models.peft_methods import AdapterDisabled, with_lora

    base, tokenizer = load_model(world["sft"])
    wrapped = with_lora(load_model(world["sft"])[0], r=4, alpha=8, field="ppo.policy")
    with torch.no_grad():  # make the adapters matter
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    ids = torch.tensor([tokenizer("<q> what does anna have ? <a> a red ball")["input_ids"]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        assert not torch.allclose(wrapped(input_ids=ids).logits, want, atol=1e-4)
        torch.testing.assert_close(AdapterDisabled(wrapped)(input_ids=ids).logits, want)
    assert list(AdapterDisabled(wrapped).parameters()) == []  # a view, not a copy


def _padded(ro, left: int, right: int, pad_id: int):
    """``ro`` with ``left`` more all-padding query columns and ``right`` more masked response columns."""
    def wider(t, lo, hi, value=0):
        return torch.nn.functional.pad(t, (lo, hi), value=value)

    return dataclasses.replace(
        ro, input_ids=wider(ro.input_ids, left, right, pad_id), attention_mask=wider(ro.attention_mask, left, right),
        response_ids=wider(ro.response_ids, 0, right, pad_id), mask=wider(ro.mask, 0, right),
        logp=wider(ro.logp, 0, right), ref_logp=wider(ro.ref_logp, 0, right), values=wider(ro.values, 0, right))


def test_minibatch_cuts_the_columns_that_are_padding_in_all_its_rows(world):
    from selfrank.train.rl.rollout import minibatch

    actor, tokenizer = load_model(world["sft"])
    model = PolicyAndValue(actor, ValueModel.from_reward_model(RewardModel.from_pretrained(world["rm"])))
    cfg = PPOConfig(batch_size=4, samples_per_prompt=1, max_new_tokens=6)
    ro = _padded(collect_rollout(model, actor, None, tokenizer, PROMPTS[:4], cfg, row_seeds(2, 1, 0, 4, 1)),
                 3, 2, tokenizer.pad_token_id)
    zeros = torch.zeros_like(ro.mask, dtype=torch.float32)
    for rows in ([0], [1, 3], [0, 1, 2, 3]):
        idx = torch.tensor(rows)
        mb = minibatch(ro, idx, zeros, zeros)
        # Every row of the minibatch keeps all of its real tokens, and no column is padding in all rows.
        assert int(mb.attention_mask.sum()) == int(ro.attention_mask[idx].sum())
        assert int(mb.mask.sum()) == int(ro.mask[idx].sum())
        assert bool(mb.attention_mask[:, 0].any()) and bool(mb.mask[:, -1].any())
        # The 3 + 2 columns of padding added to every row are gone (at least).
        assert mb.input_ids.shape == mb.attention_mask.shape
        assert mb.input_ids.shape[1] <= ro.input_ids.shape[1] - 5 and mb.response_length <= ro.response_ids.shape[1] - 2
        torch.testing.assert_close(mb.input_ids[:, -mb.response_length:], mb.response_ids)


def test_separate_passes_on_cut_minibatches_equal_one_pass_over_the_padded_batch(world):
    """The update's two tricks change no number: actor then critic passes (one process) give the joint
    pass's gradients, and cutting the all-padding columns gives the padded batch's outputs."""
    from selfrank.train.dist.collectives import get_accelerator
    from selfrank.train.optim import adamw_groups
    from selfrank.train.stages.ppo import ppo_update

    actor, tokenizer = load_model(world["sft"])
    rm = RewardModel.from_pretrained(world["rm"])
    cfg = PPOConfig(batch_size=4, samples_per_prompt=2, max_new_tokens=6, ppo_epochs=2, minibatches=2)
    model = PolicyAndValue(actor, ValueModel.from_reward_model(rm))
    ro = collect_rollout(model, actor, rm, tokenizer, PROMPTS[:4], cfg, row_seeds(4, 1, 0, 4, 2))
    gen = torch.Generator().manual_seed(0)
    advantages = torch.randn(ro.mask.shape, generator=gen) * ro.mask
    returns = torch.randn(ro.mask.shape, generator=gen) * ro.mask
    padded = _padded(ro, 2, 3, tokenizer.pad_token_id)
    wide = [torch.nn.functional.pad(t, (0, 3)) for t in (advantages, returns)]
    results = []
    for rollout, adv, ret, separate in ((ro, advantages, returns, True), (padded, *wide, False)):
        torch.manual_seed(0)
        actor, _ = load_model(world["sft"])
        model = PolicyAndValue(actor, ValueModel.from_reward_model(rm)).train()
        optimizer = adamw_groups([(actor, 1e-3), (model.value, 1e-3)])
        stats = ppo_update(model, optimizer, rollout, adv, ret, cfg, torch.Generator().manual_seed(7),
                           get_accelerator(), separate=separate)
        results.append((stats, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (stats_a, weights_a), (stats_b, weights_b) = results
    assert stats_a is not None and stats_b is not None
    for key in stats_a:
        assert stats_a[key] == pytest.approx(stats_b[key], rel=1e-4, abs=1e-6), key
    start = PolicyAndValue(load_model(world["sft"])[0], ValueModel.from_reward_model(rm)).state_dict()
    assert any(not torch.equal(weights_a[k], start[k]) for k in start)  # the update moved the weights
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], atol=1e-5, rtol=1e-4)
