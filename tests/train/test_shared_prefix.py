"""Prefix-shared K-way decoding (train/sampling/shared_prefix.py) against model.generate over repeated prompts."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from selfrank.train.sampling.generation import generate
from selfrank.train.sampling.shared_prefix import decode_shared_prefix
from selfrank.train.models.reward_model import position_ids_from_mask

from tests.train.helpers import tiny_policy, tiny_tokenizer

PROMPTS = ["<c> tom lives in rome . <q> what pet does tom have ? <a>", "<c> ann likes red . <q> where ? <a>",
           "<c> sam has 3 eggs . sam gets 4 more eggs . <q> how many eggs does sam have ? <a>"]
K = 4
SEEDS = [1000 + i for i in range(len(PROMPTS) * K)]


def tiny_llama(seed: int = 0):
    """A random Llama (grouped-query attention, rotary positions) sized for the test tokenizer."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(config), tok


MODELS = {"gpt2": tiny_policy, "llama": tiny_llama}


def biased(model, token_ids: list[int], bias: float):
    """Make ``token_ids`` likely (answers then end at different steps); returns the hook handle."""
    head = model.get_output_embeddings()
    shift = torch.zeros(head.weight.shape[0])
    shift[token_ids] = bias
    return head.register_forward_hook(lambda module, inputs, output: output + shift)


def answers(model, tok, method: str, **kwargs):
    args = dict(n=K, seeds=SEEDS, temperature=0.7, top_p=0.9, max_new_tokens=10, batch_size=len(SEEDS))
    args.update(kwargs)
    return generate(model, tok, PROMPTS, method=method, **args)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_sampled_tokens_and_logprobs_equal_the_repeated_generate(arch):
    model, tok = MODELS[arch]()
    hook = biased(model, [tok.eos_token_id], 2.5)
    try:
        ours = answers(model, tok, "shared_prefix", record=True)
        reference = answers(model, tok, "repeat", record=True)
    finally:
        hook.remove()
    assert ours.ended.any() and not ours.ended.all()  # answers of different lengths, some cut at the limit
    assert torch.equal(ours.response_ids, reference.response_ids)
    assert torch.equal(ours.response_mask, reference.response_mask)
    assert torch.equal(ours.query_ids, reference.query_ids) and torch.equal(ours.query_mask, reference.query_mask)
    assert torch.equal(ours.ended, reference.ended) and ours.texts == reference.texts
    torch.testing.assert_close(ours.logp, reference.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.entropy, reference.entropy, atol=1e-5, rtol=0)
    assert len(set(ours.texts[:K])) > 1  # one prompt's answers differ: each has its own stream


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_greedy_equals_hf_greedy(arch):
    model, tok = MODELS[arch]()
    ours = generate(model, tok, PROMPTS, do_sample=False, max_new_tokens=8, method="shared_prefix")
    reference = generate(model, tok, PROMPTS, do_sample=False, max_new_tokens=8, method="repeat")
    assert torch.equal(ours.response_ids, reference.response_ids) and ours.texts == reference.texts
    # and each prompt alone (no padding at all) gives the same answer
    model.eval()
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        real = int(ours.response_mask[i].sum())
        assert ours.response_ids[i, :real].tolist() == alone[0, ids.shape[1]:][:real].tolist()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_recorded_logprobs_equal_a_full_forward_at_the_temperature(arch):
    model, tok = MODELS[arch]()
    model.train()  # decoding must switch dropout off and give the mode back
    temperature = 0.7
    hook = biased(model, [tok.eos_token_id], 2.0)
    try:
        out = answers(model, tok, "shared_prefix", record=True)
        assert model.training
        model.eval()
        ids = torch.cat([out.query_ids, out.response_ids], 1)
        mask = torch.cat([out.query_mask, out.response_mask], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    finally:
        hook.remove()
    width = out.response_ids.shape[1]
    tempered = torch.log_softmax(logits[:, -width - 1:-1].float() / temperature, -1)
    expected = tempered.gather(-1, out.response_ids.unsqueeze(-1)).squeeze(-1) * out.response_mask
    torch.testing.assert_close(out.logp, expected, atol=1e-5, rtol=0)
    entropy = -(tempered.exp() * tempered).sum(-1) * out.response_mask
    torch.testing.assert_close(out.entropy, entropy, atol=1e-5, rtol=0)
    assert out.response_mask.sum() > len(out)  # answers longer than one token were checked


def test_stops_at_any_stop_id_and_early_when_all_ended():
    model, tok = tiny_policy()
    stop = int(tok("eggs", add_special_tokens=False)["input_ids"][0])
    hook = biased(model, [stop], 3.0)
    try:
        free = answers(model, tok, "shared_prefix", max_new_tokens=30)
        cut = answers(model, tok, "shared_prefix", max_new_tokens=30, stop_ids=[tok.eos_token_id, stop])
    finally:
        hook.remove()
    assert cut.ended.all() and cut.response_ids.shape[1] < 30  # every answer stopped: decoding stopped early
    for row in range(len(cut)):
        real = int(cut.response_mask[row].sum())
        tokens = cut.response_ids[row, :real].tolist()
        assert tokens[-1] in (stop, tok.eos_token_id)
        assert stop not in tokens[:-1] and tok.eos_token_id not in tokens[:-1]
        assert (cut.response_ids[row, real:] == tok.pad_token_id).all()
        # The same seed decodes the same tokens; the stop id only cuts the answer there.
        assert free.response_ids[row, :real].tolist() == tokens
    assert any(cut.response_ids[r, int(cut.response_mask[r].sum()) - 1] == stop for r in range(len(cut)))


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_chunks_of_rows_give_the_same_answers(arch):
    model, tok = MODELS[arch]()
    hook = biased(model, [tok.eos_token_id], 2.5)
    try:
        whole = answers(model, tok, "shared_prefix", record=True)
        chunked = answers(model, tok, "shared_prefix", record=True, batch_size=3)  # chunks cut across prompts
    finally:
        hook.remove()
    assert torch.equal(whole.response_ids, chunked.response_ids)
    assert torch.equal(whole.response_mask, chunked.response_mask) and torch.equal(whole.ended, chunked.ended)
    torch.testing.assert_close(whole.logp, chunked.logp, atol=1e-5, rtol=0)


def test_an_answer_depends_only_on_its_prompt_and_seed():
    """Two processes' shares decoded apart give the answers of one process decoding the whole batch."""
    model, tok = tiny_llama()
    together = answers(model, tok, "shared_prefix")
    first = generate(model, tok, PROMPTS[:1], n=K, seeds=SEEDS[:K], temperature=0.7, top_p=0.9, max_new_tokens=10)
    rest = generate(model, tok, PROMPTS[1:], n=K, seeds=SEEDS[K:], temperature=0.7, top_p=0.9, max_new_tokens=10)
    assert together.texts == first.texts + rest.texts
    for part, offset in ((first, 0), (rest, K)):
        width = part.response_ids.shape[1]
        assert torch.equal(together.response_ids[offset:offset + len(part), :width], part.response_ids)
    # and the reversed prompt order gives each answer unchanged
    order = [2, 1, 0]
    seeds = [SEEDS[i * K + j] for i in order for j in range(K)]
    reversed_ = generate(model, tok, [PROMPTS[i] for i in order], n=K, seeds=seeds, temperature=0.7, top_p=0.9,
                         max_new_tokens=10)
    assert reversed_.texts == [together.texts[i * K + j] for i in order for j in range(K)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synced_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tok = tiny_policy()
        forwards = []
        model.register_forward_hook(lambda *args: forwards.append(1))
        hook = biased(model, [tok.eos_token_id], 8.0 if rank == 0 else -8.0)  # rank 0 ends early, rank 1 never
        share = slice(0, 1) if rank == 0 else slice(1, 3)  # uneven shares: 1 prompt vs 2, so 1 vs 2 chunks
        rows = slice(share.start * K, share.stop * K)
        ids = [tok(p)["input_ids"] for p in PROMPTS[share]]
        width = max(map(len, ids))
        query = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids])
        mask = (torch.arange(width) >= width - torch.tensor([len(r) for r in ids]).unsqueeze(1)).long()
        decode = dict(max_new_tokens=12, stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, temperature=0.7,
                      top_p=0.9)
        out = decode_shared_prefix(model, query, mask, n=K, seeds=SEEDS[rows], max_rows=K, synced=True, **decode)
        count = len(forwards)
        alone = [decode_shared_prefix(model, query[i:i + 1], mask[i:i + 1], n=K,
                                      seeds=SEEDS[rows][i * K:(i + 1) * K], **decode).response_ids.tolist()
                 for i in range(len(ids))]
        hook.remove()
        # A process with no prompt at all still steps along (generate's empty share).
        forwards.clear()
        empty = generate(model, tok, PROMPTS[:rank], n=K, seed=3, max_new_tokens=12, synced=True)
        queue.put((rank, count, out.response_ids.tolist(), alone, len(forwards), len(empty)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_synced_processes_run_the_same_number_of_forwards():
    """Under ``synced`` (ZeRO-3 with sharded weights) a process that finished keeps stepping with the
    others: real gloo processes with uneven work run equally many forwards, and the answers of the
    busy process are those of unsynced decoding."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_synced_worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (queue.get(timeout=600) for _ in procs))
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    (forwards0, ids0, alone0, empty0, rows0), (forwards1, ids1, alone1, empty1, rows1) = results[0], results[1]
    assert rows0 == 0 and rows1 == K and empty0 == empty1 > 1
    assert forwards0 == forwards1 == 2 * 12  # rank 1: two chunks of 12 steps; rank 0 ended early and idled
    assert len(alone0[0][0]) < 12  # (rank 0 really had less work)
    # Synced or not, in chunks or alone, each answer is the same.
    assert ids0 == alone0[0]
    assert ids1 == alone1[0] + alone1[1]


def test_nucleus_equals_the_top_p_warper_for_peaked_and_flat_rows():
    """The nucleus from the top candidates (peaked rows) and from a full sort (flat rows whose nucleus
    is larger than the candidates) is the set transformers' TopPLogitsWarper keeps."""
    from transformers import TopPLogitsWarper

    from selfrank.train.sampling.row_sampler import NUCLEUS_CANDIDATES, nucleus

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3000, generator=generator, dtype=torch.float64)
    logits[:3] *= 12.0  # peaked: a nucleus of a few tokens
    logits[3:] *= 0.3  # flat: a nucleus of thousands
    for top_p in (0.5, 0.9, 0.95):
        expected = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        kept = nucleus(torch.softmax(logits, -1), top_p)
        assert torch.equal(kept, expected)
        sizes = kept.sum(-1)
        assert (sizes[:3] < NUCLEUS_CANDIDATES).all() and (sizes[3:] > NUCLEUS_CANDIDATES).all()
