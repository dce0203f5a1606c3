"""Batched generation: ordering, shapes, masks after EOS, seeding, left padding."""
from __future__ import annotations

import torch

from selfrank.train.sampling.generation import generate, response_mask_after_eos
from selfrank.train.models.causal_lm import encode_prompt_response

from tests.train.helpers import tiny_policy

PROMPTS = ["<c> tom lives in rome . <q> what pet does tom have ? <a>", "<c> ann likes red . <q> where does ann live ? <a>",
           "<c> sam has 3 eggs . sam gets 4 more eggs . <q> how many eggs does sam have ? <a>"]


def test_mask_after_first_eos():
    ids = torch.tensor([[5, 0, 7, 0], [5, 6, 7, 8], [0, 9, 9, 9]])
    mask, ended = response_mask_after_eos(ids, eos_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_shapes_order_masks_and_eos():
    model, tok = tiny_policy()
    # make EOS likely so that both ended and unended rows occur
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 3.0
    hook = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        g = generate(model, tok, PROMPTS, n=4, max_new_tokens=12, seed=3, batch_size=5)
    finally:
        hook.remove()
    B = len(PROMPTS) * 4
    assert g.query_ids.shape[0] == B and g.response_ids.shape[0] == B and len(g.texts) == B
    assert g.response_ids.shape[1] <= 12
    for i in range(len(PROMPTS)):
        expected = tok(PROMPTS[i])["input_ids"]
        for j in range(4):
            row = g.query_ids[i * 4 + j][g.query_mask[i * 4 + j].bool()].tolist()
            assert row == expected
    assert g.query_mask[:, -1].all()  # left padded
    assert g.ended.any() and not g.ended.all()
    for r in range(B):
        ids, mask = g.response_ids[r], g.response_mask[r]
        n_real = int(mask.sum())
        assert mask[:n_real].all() and not mask[n_real:].any()
        assert (ids[n_real:] == tok.pad_token_id).all()
        eos_positions = (ids[:n_real] == tok.eos_token_id).nonzero().flatten().tolist()
        if g.ended[r]:
            assert eos_positions == [n_real - 1]
        else:
            assert eos_positions == [] and n_real == g.response_ids.shape[1]
        assert g.texts[r] == tok.decode(ids[:n_real], skip_special_tokens=True).strip()


def test_seeded_reproducible_and_restores_mode_and_rng():
    model, tok = tiny_policy()
    model.train()
    torch.manual_seed(123)
    a = generate(model, tok, PROMPTS, n=3, max_new_tokens=10, seed=7, temperature=0.8, top_p=0.95)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = generate(model, tok, PROMPTS, n=3, max_new_tokens=10, seed=7, temperature=0.8, top_p=0.95)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert torch.equal(torch.rand(1), after)  # the caller's random stream is untouched
    c = generate(model, tok, PROMPTS, n=3, max_new_tokens=10, seed=8, temperature=0.8, top_p=0.95)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert model.training  # mode restored


def test_greedy_left_padding_matches_unpadded_and_scoring():
    model, tok = tiny_policy()
    batched = generate(model, tok, PROMPTS, do_sample=False, max_new_tokens=6)
    for i, prompt in enumerate(PROMPTS):
        single = generate(model, tok, [prompt], do_sample=False, max_new_tokens=6)
        n_real = int(single.response_mask[0].sum())
        assert batched.response_ids[i, :n_real].tolist() == single.response_ids[0, :n_real].tolist()
    # greedy tokens are the argmax of the model's own logits over prompt + response (teacher forcing)
    ids, plen = encode_prompt_response(tok, PROMPTS[0], "", 64, add_eos=False)
    row = batched.response_ids[0][batched.response_mask[0].bool()].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids + row])).logits[0]
    assert logits[plen - 1:plen - 1 + len(row)].argmax(-1).tolist() == row


def test_prompt_truncation_from_left():
    model, tok = tiny_policy()
    g = generate(model, tok, PROMPTS[:1], max_new_tokens=2, max_prompt_length=5, seed=0)
    assert g.query_ids.shape[1] == 5
    assert g.query_ids[0].tolist() == tok(PROMPTS[0])["input_ids"][-5:]
