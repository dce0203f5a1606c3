"""Tokenizer, tiny model, save/load and local/hub loading."""
from __future__ import annotations

import json
import time

import pytest
import torch

from selfrank.errors import UserError
from selfrank.train.config import ModelConfig
from selfrank.train.models.causal_lm import (EOS_TOKEN, PAD_TOKEN, encode_prompt_response, init_policy, load_causal_lm, load_model,
                          save_model)

from tests.train.helpers import TINY_MODEL, tiny_config, tiny_policy, tiny_texts, tiny_tokenizer


def test_tokenizer_round_trip_and_distinct_specials():
    tok = tiny_tokenizer()
    text = "<c> ann has 3 apples . <q> how many apples does ann have ? <a> 7 apples"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text.replace(" <q>", "<q>").replace(" <a>", "<a>")  # markers absorb the space
    assert tok.pad_token == PAD_TOKEN and tok.eos_token == EOS_TOKEN
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    for marker in ("<c>", "<q>", "<a>"):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    assert "<a>" not in tok.decode(ids, skip_special_tokens=True)


def test_encode_prompt_response_masks_and_truncates_prompt_from_left():
    tok = tiny_tokenizer()
    prompt, answer = "<c> ann likes red . <q> what does ann do ? <a>", "a baker"
    ids, plen = encode_prompt_response(tok, prompt, answer, 64)
    assert ids[:plen] == tok(prompt)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[plen:], skip_special_tokens=True).strip() == answer
    budget = len(ids) - plen + 3
    short, splen = encode_prompt_response(tok, prompt, answer, budget)
    assert len(short) == budget and splen == 3 and short[splen:] == ids[plen:]
    assert short[:splen] == ids[plen - splen:plen]  # the END of the prompt survives


def test_save_load_round_trip_safetensors_only(tmp_path):
    model, tok = tiny_policy()
    save_model(model, tok, tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    loaded, ltok = load_model(tmp_path / "m")
    x = torch.tensor([tok("<c> tom lives in rome . <q> what pet does tom have ? <a>")["input_ids"]])
    model.eval()
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert ltok.pad_token_id == tok.pad_token_id and ltok.eos_token_id == tok.eos_token_id
    assert ltok.padding_side == "left"
    # saving again replaces the folder atomically
    save_model(loaded, ltok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_load_causal_lm_local_folder_and_pad_fix(tmp_path):
    model, tok = tiny_policy(tmp_path)
    folder = tmp_path / "policy"
    # a folder whose tokenizer uses EOS as pad (the GPT-2 habit) gets its own pad token
    cfg_path = folder / "tokenizer_config.json"
    conf = json.loads(cfg_path.read_text())
    conf["pad_token"] = EOS_TOKEN
    cfg_path.write_text(json.dumps(conf))
    loaded, ltok = load_causal_lm(str(folder), ModelConfig(name=str(folder)))
    assert ltok.pad_token_id != ltok.eos_token_id
    assert loaded.get_input_embeddings().num_embeddings >= len(ltok)
    assert loaded.config.pad_token_id == ltok.pad_token_id


def test_pickled_weights_refused(tmp_path):
    model, tok = tiny_policy(tmp_path)
    folder = tmp_path / "policy"
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors"):
        load_causal_lm(str(folder), ModelConfig(name=str(folder)))


def test_unknown_hub_name_offline_fails_fast():
    start = time.time()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE|local"):
        load_causal_lm("no-such-org/no-such-model-xyz", ModelConfig(name="no-such-org/no-such-model-xyz"))
    assert time.time() - start < 10


def test_init_policy_tiny_and_from_folder(tmp_path):
    cfg = tiny_config(tmp_path)
    model, tok = init_policy(cfg.model, tiny_texts(cfg), ["<c>", "<q>", "<a>"])
    assert model.config.n_embd == TINY_MODEL.n_embd and model.config.vocab_size == len(tok)
    save_model(model, tok, tmp_path / "base")
    # from a folder: new markers are added as special tokens and the embeddings grow
    model2, tok2 = init_policy(ModelConfig(name=str(tmp_path / "base")), [], ["<c>", "<new>"])
    assert len(tok2("<new>", add_special_tokens=False)["input_ids"]) == 1
    assert model2.get_input_embeddings().num_embeddings == len(tok2) == len(tok) + 1
