"""Reward-model training: losses by hand, data and held-out split, training, normaliser, resume."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from selfrank.errors import UserError
from selfrank.train.config import RewardConfig
from selfrank.train.data.preferences import (
    PreferencePair,
    heldout_prompts,
    load_pairs,
    load_ranked,
    split_pairs,
    training_items,
)
from selfrank.train.rl.reward_losses import listwise_loss, pairwise_accuracy, pairwise_loss
from selfrank.train.stages.reward import fit_normalizer, train_reward
from selfrank.train.models.reward_model import RewardModel, score

from tests.train.helpers import tiny_config, tiny_policy


# ---- losses ---------------------------------------------------------------------------------------
def test_pairwise_loss_by_hand():
    r_w = torch.tensor([2.0, 0.0, -1.0])
    r_l = torch.tensor([0.0, 1.0, -1.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 2, -1, 0
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    assert float(pairwise_loss(r_w, r_l)) == pytest.approx(expected, rel=1e-6)


def test_pairwise_loss_is_stable_for_large_margins():
    assert float(pairwise_loss(torch.tensor([0.0]), torch.tensor([1000.0]))) == pytest.approx(1000.0)
    assert float(pairwise_loss(torch.tensor([1000.0]), torch.tensor([0.0]))) == 0.0
    r_w = torch.tensor([-500.0], requires_grad=True)
    pairwise_loss(r_w, torch.tensor([500.0])).backward()
    assert float(r_w.grad) == pytest.approx(-1.0)


def test_listwise_loss_three_items_by_hand():
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # P(order 0,1,2) = e^2/(e^2+e^1+e^0) * e^1/(e^1+e^0)
    expected = -(math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1)) + math.log(math.exp(1) / (math.exp(1) + 1)))
    assert float(listwise_loss(scores, mask)) == pytest.approx(expected, rel=1e-6)
    # The reversed order is less likely, so costs more.
    assert float(listwise_loss(scores.flip(-1), mask)) > expected


def test_listwise_loss_masks_padding_and_skips_short_lists():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.5, 3.0, 99.0], [7.0, -4.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    row0 = math.log(math.exp(2) + math.exp(1) + 1) - 2 + math.log(math.exp(1) + 1) - 1
    row1 = math.log(math.exp(0.5) + math.exp(3)) - 0.5  # the padded 99 takes no part
    assert float(listwise_loss(scores, mask)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # A list of two is exactly the pairwise loss.
    pair = torch.tensor([[0.3, 1.7]])
    assert float(listwise_loss(pair, torch.ones(1, 2))) == pytest.approx(
        float(pairwise_loss(torch.tensor([0.3]), torch.tensor([1.7]))), rel=1e-6)
    # No list with two items: zero loss that still backpropagates.
    lone = torch.tensor([[1.0, 2.0]], requires_grad=True)
    value = listwise_loss(lone, torch.tensor([[1, 0]]))
    value.backward()
    assert float(value.detach()) == 0.0 and lone.grad is not None


def test_listwise_loss_gradient_prefers_the_given_order():
    scores = torch.zeros(1, 3, requires_grad=True)
    listwise_loss(scores, torch.ones(1, 3)).backward()
    # Descending the gradient raises the first item and lowers the last.
    assert scores.grad[0, 0] < 0 < scores.grad[0, 2]


def test_pairwise_accuracy_counts_ties_as_misses():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == 0.5


def test_fit_normalizer_by_hand():
    fitted = fit_normalizer(np.array([1.0, 3.0]))  # mean 2, population std 1
    assert fitted["gain"] == pytest.approx(1.0) and fitted["bias"] == pytest.approx(-2.0)
    fitted = fit_normalizer(np.array([0.0, 4.0, 8.0]))
    normalised = fitted["gain"] * np.array([0.0, 4.0, 8.0]) + fitted["bias"]
    assert normalised.mean() == pytest.approx(0.0, abs=1e-12) and normalised.std() == pytest.approx(1.0)
    constant = fit_normalizer(np.full(5, 3.0))  # no spread: centre only, never divide by ~0
    assert constant["gain"] == 1.0 and constant["bias"] == pytest.approx(-3.0)


# ---- data and split ------------------------------------------------------------------------------
NAMES = "tom ann amy eva leo sam kim zoe ian bob".split()
COLORS = "gray red blue white pink brown black".split()
THINGS = "box cup ball lamp coat bag hat pen shells".split()


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(NAMES)} has a {rng.choice(COLORS)} {rng.choice(THINGS)} ."


def _shuffled(sentence: str, rng: random.Random) -> str:
    """The same words in another order (the final '.' stays last, so the end token gives nothing away)."""
    words = sentence.split()[:-1]
    while True:
        rng.shuffle(words)
        text = " ".join(words) + " ."
        if text != sentence:
            return text


def write_preferences(folder: Path, n_prompts: int = 40, per_prompt: int = 3, seed: int = 0) -> tuple[Path, Path]:
    """A separable preference: winners are sentences, losers the same words shuffled. Every third
    pair carries a noised loser (the winner with its last word repeated)."""
    rng = random.Random(seed)
    pair_rows, groups = [], []
    for i in range(n_prompts):
        prompt = f"<q> what does {NAMES[i % len(NAMES)]} have ? ({i}) <a>"
        responses, pairs, noise = [], [], []
        for k in range(per_prompt):
            winner = _sentence(rng)
            loser = _shuffled(winner, rng)
            noised = f"{loser} {loser.split()[0]}" if (i * per_prompt + k) % 3 == 0 else None
            pair_rows.append({"group_id": f"g{i}", "prompt": prompt, "winner": winner, "loser": loser,
                              "loser_noised": noised, "noise_kind": "ngram_insert" if noised else None})
            pairs.append([len(responses), len(responses) + 1])
            noise.append({"kind": "ngram_insert", "text": noised} if noised else None)
            responses += [winner, loser]
        order = [j for j in range(len(responses)) if j % 2 == 0] + [j for j in range(len(responses)) if j % 2]
        groups.append({"id": f"g{i}", "prompt": prompt, "responses": responses,
                       "scores": [1.0 / len(responses)] * len(responses), "order": order,
                       "clusters": list(range(len(responses))), "representatives": order,
                       "pairs": pairs, "noise": noise})
    pairs_path, ranked_path = folder / "pairs.jsonl", folder / "ranked.jsonl"
    pairs_path.write_text("".join(json.dumps(r) + "\n" for r in pair_rows))
    ranked_path.write_text("".join(json.dumps(g) + "\n" for g in groups))
    return pairs_path, ranked_path


def test_heldout_split_shares_no_prompt_and_is_deterministic(tmp_path):
    pairs_path, _ = write_preferences(tmp_path, n_prompts=30)
    pairs = load_pairs(pairs_path)
    prompts = [p.prompt for p in pairs]
    held = heldout_prompts(prompts, 0.2, seed=7)
    assert len(held) == 6
    train, heldout = split_pairs(pairs, held)
    assert len(train) + len(heldout) == len(pairs) and heldout
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert not {p.group_id for p in train} & {p.group_id for p in heldout}
    # Same answer for any order of the input, different answer for another seed.
    assert heldout_prompts(list(reversed(prompts)), 0.2, seed=7) == held
    assert heldout_prompts(prompts, 0.2, seed=8) != held
    assert heldout_prompts(prompts, 0.0, seed=7) == set()
    assert len(heldout_prompts(["a", "b"], 0.9, seed=0)) == 1  # never everything


def test_training_items_noise_flag_and_heldout(tmp_path):
    pairs_path, ranked_path = write_preferences(tmp_path, n_prompts=6)
    pairs, groups = load_pairs(pairs_path), load_ranked(ranked_path)
    held = {pairs[0].prompt}
    plain = training_items(pairs, groups, held, "pairwise", use_noise=False)
    noised = training_items(pairs, groups, held, "pairwise", use_noise=True)
    kept = [p for p in pairs if p.prompt not in held]
    assert [t for _, t in plain] == [[p.winner, p.loser] for p in kept]
    assert [t for _, t in noised] == [[p.winner, p.loser_noised or p.loser] for p in kept]
    assert sum(p.loser_noised is not None for p in kept) > 0
    assert sum(a != b for a, b in zip(plain, noised)) == sum(p.loser_noised is not None for p in kept)
    lists = training_items(pairs, groups, held, "listwise", use_noise=False)
    assert len(lists) == len(groups) - 1 and all(prompt not in held for prompt, _ in lists)
    group = groups[1]
    assert lists[0] == (group.prompt, [group.responses[i] for i in group.representatives])
    assert PreferencePair("g", "p", "w", "l", None).loser_text(True) == "l"


def test_load_pairs_errors_name_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"group_id": "g1", "prompt": "p", "winner": "w", "loser": "l"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"group_id": "g2", "prompt": "p"}) + "\n")
    with pytest.raises(UserError, match=r"pairs\.jsonl:2: missing key 'winner'"):
        load_pairs(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "prompt": "other"}) + "\n")
    with pytest.raises(UserError, match=r"pairs\.jsonl:2: group_id 'g1' appears with two different prompts"):
        load_pairs(path)
    path.write_text(json.dumps({**good, "loser_noised": 3}) + "\n")
    with pytest.raises(UserError, match=r"pairs\.jsonl:1: 'loser_noised'"):
        load_pairs(path)


# ---- training ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward")
    tiny_policy(folder)  # saves the tiny SFT stand-in to folder / "policy"
    pairs_path, ranked_path = write_preferences(folder)
    return {"sft": folder / "policy", "pairs": pairs_path, "ranked": ranked_path, "root": folder}


def _config(**reward):
    settings = dict(lr=3e-3, batch_size=16, epochs=3.0, max_length=64, heldout_fraction=0.25)
    settings.update(reward)
    return tiny_config(reward=RewardConfig(**settings))


def _heldout_accuracy(rm, tokenizer, pairs):
    prompts = [p.prompt for p in pairs]
    r_w = score(rm, tokenizer, prompts, [p.winner for p in pairs], max_length=64, normalized=False)
    r_l = score(rm, tokenizer, prompts, [p.loser for p in pairs], max_length=64, normalized=False)
    return pairwise_accuracy(torch.from_numpy(r_w), torch.from_numpy(r_l))


def test_pairwise_training_generalises_to_unseen_prompts_and_normalises(world, tmp_path):
    config = _config()
    pairs = load_pairs(world["pairs"])
    groups = load_ranked(world["ranked"])
    held = heldout_prompts([p.prompt for p in pairs], 0.25, config.seed)
    _, heldout_pairs = split_pairs(pairs, held)
    untrained = RewardModel.from_causal_lm(world["sft"])
    before = _heldout_accuracy(untrained, untrained.tokenizer, heldout_pairs)

    ref_prompts = [g.prompt for g in groups for _ in g.responses]
    ref_responses = [r for g in groups for r in g.responses]
    summary = train_reward(config, world["sft"], world["pairs"], world["ranked"], tmp_path / "rm",
                           normalize_prompts=ref_prompts, normalize_responses=ref_responses)
    assert summary["heldout_prompts"] == len(held) == 10 and summary["heldout_pairs"] == 30
    assert summary["train_pairs"] == 90 and summary["steps"] == 18
    assert summary["heldout_accuracy"] >= 0.85, summary
    assert summary["heldout_accuracy"] >= before + 0.2, (before, summary)
    assert summary["final_loss"] < math.log(2) and summary["seconds"] > 0

    rm = RewardModel.from_pretrained(tmp_path / "rm")
    assert _heldout_accuracy(rm, rm.tokenizer, heldout_pairs) == pytest.approx(summary["heldout_accuracy"])
    normalised = score(rm, rm.tokenizer, ref_prompts, ref_responses, max_length=64)
    assert abs(float(normalised.mean())) < 1e-4 and float(normalised.std()) == pytest.approx(1.0, abs=1e-4)
    assert summary["normalizer"]["reference_samples"] == len(ref_responses)
    assert not (tmp_path / "checkpoint").exists(), "a finished run removes its checkpoint"


def test_listwise_training_learns_the_order(world, tmp_path):
    summary = train_reward(_config(), world["sft"], world["pairs"], world["ranked"], tmp_path / "rm", loss="listwise")
    assert summary["loss"] == "listwise" and summary["train_items"] == 30  # one list per training prompt
    assert summary["heldout_accuracy"] >= 0.8, summary


def test_noise_flag_trains_on_noised_losers(world, tmp_path):
    config = _config(max_steps=2)
    plain = train_reward(config, world["sft"], world["pairs"], world["ranked"], tmp_path / "a")
    noised = train_reward(config, world["sft"], world["pairs"], world["ranked"], tmp_path / "b", use_noise=True)
    assert noised["use_noise"] and "heldout_accuracy_noised" in noised and "heldout_accuracy_noised" not in plain
    # Same seed, same batches: only the noised losers can make the two runs differ.
    assert noised["final_loss"] != plain["final_loss"]


def test_resume_equals_uninterrupted(world, tmp_path):
    config = _config(max_steps=7, save_every=3)
    full = train_reward(config, world["sft"], world["pairs"], world["ranked"], tmp_path / "full" / "model")

    class Interrupted(Exception):
        pass

    def stop_at_five(step, loss):
        if step == 5:
            raise Interrupted

    out = tmp_path / "cut" / "model"
    with pytest.raises(Interrupted):
        train_reward(config, world["sft"], world["pairs"], world["ranked"], out, on_step=stop_at_five)
    assert (tmp_path / "cut" / "checkpoint").is_dir() and not out.exists()
    # A checkpoint made with other settings is refused, not silently mixed in.
    with pytest.raises(UserError, match="other reward settings"):
        train_reward(_config(max_steps=7, save_every=3, lr=5e-4), world["sft"], world["pairs"], world["ranked"],
                     out, resume=True)
    resumed = train_reward(config, world["sft"], world["pairs"], world["ranked"], out, resume=True)
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 7
    assert resumed["final_loss"] == full["final_loss"]
    a, b = RewardModel.from_pretrained(tmp_path / "full" / "model"), RewardModel.from_pretrained(out)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
