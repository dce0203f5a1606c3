"""K answers per prompt with one prefill per prompt: the prompt's key/value cache is forked to its answers.

Why: drawing K answers by repeating each prompt K times runs the prompt's forward (the prefill) K
times, which dominates the cost of short answers to long prompts (a 200-token SQuAD context with 24
new tokens). Here the distinct prompts of a chunk are prefilled once as a left-padded batch, the
transformers cache is forked to the answers (``Cache.batch_select_indices`` with repeated indices), and
all answers then decode together, one token per step.

Semantics equal ``model.generate`` over K copies of each prompt with
:class:`train.sampling.row_sampler.RowSeededSampler`: the same position ids (from the attention mask), the
same token picking (:func:`train.sampling.row_sampler.pick_tokens`: temperature, top-p, inverse CDF with one
uniform per answer and step from the answer's own seeded stream, or greedy), so an answer depends only
on its prompt and its seed. Answers stop at any of ``stop_ids``; a chunk stops once all its answers
have stopped, and finished answers leave the batch (their cache rows are dropped).

Memory: at most ``max_rows`` answers decode at a time (chunks of consecutive answers; a chunk
prefills only the prompts it needs).

Sharded weights (ZeRO-3 without gathering): every process must run the same number of forwards.
With ``synced=True`` (and a process group of several processes) the processes agree, with one small
all-reduce before every forward, whether anyone still has work; a process that has none runs a
one-token forward, as ``generate(synced_gpus=True)`` does.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterator

import torch

from selfrank.train.models.masks import first_shared_column, position_ids_from_mask
from selfrank.train.sampling.row_sampler import RowUniforms, pick_tokens


@dataclass
class Decoded:
    """Answers of :func:`decode_shared_prefix`, on the CPU; row ``i * n + j`` is answer ``j`` of prompt ``i``."""
    response_ids: torch.Tensor  # (N, R) right-padded with pad after the first stop token (kept)
    response_mask: torch.Tensor  # (N, R) 1 up to and including the first stop token
    ended: torch.Tensor  # (N,) bool: a stop token was produced
    logp: torch.Tensor | None  # (N, R) log-prob of each token under softmax(logits / T) (record); 0 after the end
    entropy: torch.Tensor | None  # (N, R) entropy of softmax(logits / T) at each step (record); 0 after the end


def _accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers take **kwargs
    return name in inspect.signature(base.forward).parameters


def _synced_world(synced: bool) -> bool:
    return (synced and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


class _Chunk:
    """Bookkeeping of one chunk's answers (CPU): tokens, recorded values and which answers ended."""

    def __init__(self, rows: int, record: bool):
        self.tokens: list[torch.Tensor] = []
        self.logp: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self.ended = torch.zeros(rows, dtype=torch.bool)
        self.length = torch.zeros(rows, dtype=torch.long)  # tokens produced, the stop token included
        self.record = record


def _decode_chunk(model, query_ids: torch.Tensor, query_mask: torch.Tensor, prompt_of_row: torch.Tensor,
                  uniforms: RowUniforms | None, out: _Chunk, *, temperature: float, top_p: float,
                  max_new_tokens: int, stop_ids: torch.Tensor, pad_id: int, keep_logits: bool) -> Iterator[None]:
    """Decode one chunk, yielding right BEFORE each forward (the driver decides when it runs)."""
    device = next(model.parameters()).device
    rows = prompt_of_row.shape[0]
    distinct, fork = torch.unique(prompt_of_row, return_inverse=True)
    ids, mask = query_ids[distinct], query_mask[distinct]
    first = first_shared_column(mask)  # columns that are padding in every prompt of the chunk go
    ids, mask = ids[:, first:], mask[:, first:]
    positions = position_ids_from_mask(mask)
    extra = {"logits_to_keep": 1} if keep_logits else {}
    yield
    result = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   use_cache=True, **extra)
    cache = result.cache
    # Fork: each answer gets its prompt's cache rows (repeated indices copy them).
    cache.batch_select_indices(fork.to(device))
    logits = result.logits[:, -1].float()[fork.to(device)]
    del result
    mask = mask[fork].to(device)
    next_position = (positions[fork, -1] + 1).to(device)
    active = torch.arange(rows)  # chunk rows still in the batch, in batch order
    stop_ids = stop_ids.to(device)
    for step in range(max_new_tokens):
        # Every answer's stream advances one draw per step, ended or not (as under generate): an answer's
        # t-th token always uses its t-th draw.
        uniform = uniforms.next()[active] if uniforms is not None else None
        picked, logp, entropy = pick_tokens(logits, uniform, temperature, top_p, out.record)
        tokens = torch.full((rows,), pad_id, dtype=torch.long)
        tokens[active] = picked.cpu()
        out.tokens.append(tokens)
        out.length[active] += 1
        if out.record:
            for store, values in ((out.logp, logp), (out.entropy, entropy)):
                full = torch.zeros(rows, dtype=torch.float32)
                full[active] = values.float().cpu()
                store.append(full)
        stopped = torch.isin(picked, stop_ids).cpu()
        out.ended[active[stopped]] = True
        if step == max_new_tokens - 1 or bool(stopped.all()):
            return
        if bool(stopped.any()):  # finished answers leave the batch
            keep = (~stopped).nonzero().squeeze(1)
            keep_device = keep.to(device)
            cache.batch_select_indices(keep_device)
            active, picked = active[keep], picked[keep_device]
            mask, next_position = mask[keep_device], next_position[keep_device]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        yield
        result = model(input_ids=picked.unsqueeze(1), attention_mask=mask, position_ids=next_position.unsqueeze(1),
                       cache=cache, use_cache=True)
        logits = result.logits[:, -1].float()
        del result
        next_position = next_position + 1


def _advance(steps: Iterator[None]) -> bool:
    """Run ``steps`` up to its next pending forward; False when it has none left."""
    return next(steps, StopIteration) is not StopIteration


@torch.no_grad()
def decode_shared_prefix(model, query_ids: torch.Tensor, query_mask: torch.Tensor, *, n: int,
                         seeds: list[int] | None, max_new_tokens: int, stop_ids: list[int], pad_id: int,
                         temperature: float = 1.0, top_p: float = 1.0, max_rows: int | None = None,
                         record: bool = False, synced: bool = False) -> Decoded:
    """``n`` answers to each left-padded prompt of ``(query_ids, query_mask)`` (one prompt per row).

    ``seeds``: one sampling seed per answer (``len = prompts * n``), or None for greedy decoding.
    ``record``: also return each token's log-prob and the step's entropy under softmax(logits / T).
    ``max_rows``: answers decoded at a time (None: all). ``synced``: see the module docstring.
    The model runs in eval mode; its previous mode is restored.
    """
    prompts = query_ids.shape[0]
    total = prompts * n
    if seeds is not None and len(seeds) != total:
        raise ValueError(f"decode_shared_prefix: {len(seeds)} seeds for {total} answers")
    if n < 1 or max_new_tokens < 1 or (max_rows is not None and max_rows < 1):
        raise ValueError("n, max_new_tokens and max_rows must be >= 1")
    size = max(1, total if max_rows is None else max_rows)
    prompt_of_row = torch.arange(prompts).repeat_interleave(n)
    stops = torch.tensor(sorted(set(int(s) for s in stop_ids)), dtype=torch.long)
    keep_logits = _accepts(model, "logits_to_keep")
    chunks: list[_Chunk] = []

    def work() -> Iterator[None]:
        for start in range(0, total, size):
            end = min(total, start + size)
            chunk = _Chunk(end - start, record)
            chunks.append(chunk)
            uniforms = RowUniforms(seeds[start:end]) if seeds is not None else None
            yield from _decode_chunk(model, query_ids, query_mask, prompt_of_row[start:end], uniforms, chunk,
                                     temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                     stop_ids=stops, pad_id=pad_id, keep_logits=keep_logits)

    was_training = model.training
    model.eval()
    try:
        steps = work()
        busy = _advance(steps)
        if _synced_world(synced):
            device = next(model.parameters()).device
            idle_input = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
            while True:
                anyone = torch.tensor(1.0 if busy else 0.0, device=device)
                torch.distributed.all_reduce(anyone, op=torch.distributed.ReduceOp.MAX)
                if anyone.item() == 0.0:
                    break
                if busy:
                    busy = _advance(steps)
                else:  # keep step with the others: sharded weights are gathered inside every forward
                    model(input_ids=idle_input, attention_mask=torch.ones_like(idle_input), use_cache=False)
        else:
            while busy:
                busy = _advance(steps)
    finally:
        model.train(was_training)
    return _assemble(chunks, total, pad_id, record)


def _assemble(chunks: list[_Chunk], total: int, pad_id: int, record: bool) -> Decoded:
    width = max([len(c.tokens) for c in chunks] + [1])
    response_ids = torch.full((total, width), pad_id, dtype=torch.long)
    mask = torch.zeros((total, width), dtype=torch.long)
    logp = torch.zeros((total, width)) if record else None
    entropy = torch.zeros((total, width)) if record else None
    ended = torch.zeros(total, dtype=torch.bool)
    offset = 0
    for chunk in chunks:
        rows = chunk.ended.shape[0]
        if chunk.tokens:
            steps = len(chunk.tokens)
            tokens = torch.stack(chunk.tokens, 1)
            real = torch.arange(steps).unsqueeze(0) < chunk.length.unsqueeze(1)
            response_ids[offset:offset + rows, :steps] = tokens.masked_fill(~real, pad_id)
            mask[offset:offset + rows, :steps] = real.long()
            if record:
                logp[offset:offset + rows, :steps] = torch.stack(chunk.logp, 1).masked_fill(~real, 0.0)
                entropy[offset:offset + rows, :steps] = torch.stack(chunk.entropy, 1).masked_fill(~real, 0.0)
        ended[offset:offset + rows] = chunk.ended
        offset += rows
    return Decoded(response_ids, mask, ended, logp, entropy)
