"""The reward model itself: last-token pooling under both paddings, save/load, scoring, normaliser."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfrank.errors import UserError
from selfrank.train.models.causal_lm import save_model
from selfrank.train.models.reward_model import (
    CONFIG_FILE,
    HEAD_FILE,
    RewardModel,
    encode_pairs,
    pad_batch,
    score,
)

from selfrank.train.models.masks import last_token_index, position_ids_from_mask
from tests.train.helpers import tiny_policy

PROMPTS = ["<q> who has the box ? <a>", "<c> tom has a gray box . ann has a red cup . <q> what does ann have ? <a>",
           "<q> ? <a>", "<q> how many shells does kim have ? <a>"]
RESPONSES = ["tom", "a red cup and a gray box near the lamp .", "yes", "5 shells"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_policy(seed=0)


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert position_ids_from_mask(left).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="at least one real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))
    assert last_token_index(torch.tensor([[1, 1], [0, 0]]), allow_empty=True).tolist() == [1, 0]


def test_pad_batch_sides():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=1, padding_side="left")
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=1, padding_side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_rewards_equal_with_left_right_and_no_padding(tiny):
    lm, tokenizer = tiny
    rm = RewardModel.from_causal_lm(lm, tokenizer=tokenizer)
    rm.eval()
    sequences = encode_pairs(tokenizer, PROMPTS, RESPONSES, max_length=64)
    assert len({len(s) for s in sequences}) > 1, "the check needs sequences of different lengths"
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in sequences])
        left = rm(*pad_batch(sequences, tokenizer.pad_token_id, "left"))
        right = rm(*pad_batch(sequences, tokenizer.pad_token_id, "right"))
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    assert float(alone.std()) > 1e-4, "rewards should differ between texts (a degenerate head hides pooling bugs)"


def test_reward_is_read_at_the_last_real_token(tiny):
    lm, tokenizer = tiny
    rm = RewardModel.from_causal_lm(lm, tokenizer=tokenizer)
    rm.eval()
    sequences = encode_pairs(tokenizer, PROMPTS, RESPONSES, max_length=64)
    ids, mask = pad_batch(sequences, tokenizer.pad_token_id, "right")
    with torch.no_grad():
        hidden = rm.backbone_hidden(ids, mask)
        rewards = rm(ids, mask)
    assert hidden.shape == (len(sequences), ids.shape[1], rm.head.in_features)
    by_hand = torch.stack([rm.head(hidden[i, len(s) - 1]) for i, s in enumerate(sequences)]).squeeze(-1)
    torch.testing.assert_close(rewards, by_hand)


def test_dropout_is_off(tiny):
    lm, tokenizer = tiny
    rm = RewardModel.from_causal_lm(lm, tokenizer=tokenizer)
    rm.train()
    ids, mask = pad_batch(encode_pairs(tokenizer, PROMPTS, RESPONSES, 64), tokenizer.pad_token_id)
    first, second = rm(ids, mask), rm(ids, mask)
    assert torch.equal(first, second)
    assert all(m.p == 0.0 for m in rm.modules() if isinstance(m, torch.nn.Dropout))


def test_save_load_round_trip_safetensors_only(tiny, tmp_path):
    lm, tokenizer = tiny
    rm = RewardModel.from_causal_lm(lm, tokenizer=tokenizer)
    rm.set_normalizer(gain=2.5, bias=-0.75)
    before = score(rm, tokenizer, PROMPTS, RESPONSES, batch_size=3, max_length=64)
    raw = score(rm, tokenizer, PROMPTS, RESPONSES, batch_size=3, max_length=64, normalized=False)
    np.testing.assert_allclose(before, 2.5 * raw - 0.75, rtol=1e-5, atol=1e-6)

    folder = tmp_path / "rm"
    rm.save_pretrained(folder)
    names = {p.name for p in folder.iterdir()}
    assert {HEAD_FILE, CONFIG_FILE, "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert not [p for p in tmp_path.iterdir() if p.name != "rm"], "temporary folders must not be left behind"
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["pooling"] == "last_token" and meta["gain"] == 2.5 and meta["bias"] == -0.75

    loaded = RewardModel.from_pretrained(folder)
    after = score(loaded, loaded.tokenizer, PROMPTS, RESPONSES, batch_size=2, max_length=64)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)

    # Saving again over the folder replaces it whole.
    loaded.set_normalizer(1.0, 0.0)
    loaded.save_pretrained(folder)
    reloaded = RewardModel.from_pretrained(folder)
    np.testing.assert_allclose(score(reloaded, tokenizer, PROMPTS, RESPONSES, max_length=64), raw, rtol=1e-5, atol=1e-6)


def test_from_causal_lm_folder_uses_base_transformer(tiny, tmp_path):
    lm, tokenizer = tiny
    save_model(lm, tokenizer, tmp_path / "sft")
    rm = RewardModel.from_causal_lm(tmp_path / "sft")
    assert type(rm.backbone).__name__ == "GPT2Model"
    assert rm.tokenizer is not None and rm.source == str(tmp_path / "sft")
    torch.testing.assert_close(rm.backbone.wte.weight, lm.transformer.wte.weight)


def test_score_keeps_input_order(tiny):
    lm, tokenizer = tiny
    rm = RewardModel.from_causal_lm(lm, tokenizer=tokenizer)
    forward = score(rm, tokenizer, PROMPTS, RESPONSES, batch_size=2, max_length=64)
    backward = score(rm, tokenizer, PROMPTS[::-1], RESPONSES[::-1], batch_size=3, max_length=64)
    np.testing.assert_allclose(forward, backward[::-1], rtol=1e-5, atol=1e-6)
    assert forward.dtype == np.float32 and forward.shape == (len(PROMPTS),)


def test_from_pretrained_refuses_a_plain_folder(tiny, tmp_path):
    lm, tokenizer = tiny
    save_model(lm, tokenizer, tmp_path / "lm")
    with pytest.raises(UserError, match="not a reward model folder"):
        RewardModel.from_pretrained(tmp_path / "lm")
