"""Batched sampling / greedy decoding that returns both the texts and the token tensors.

The tensors are what PPO needs (query and response ids with masks); the texts are what ranking and
evaluation need. Everything after a sequence's first stop token (EOS by default) is padding, so the
response mask covers the real tokens and the stop token itself, and nothing decoded after it. The stop
tokens are the tokenizer's (``causal_lm.stop_token_ids``: a chat template's end of turn, then EOS).

Two decoders give the same answers for the same per-answer seeds: ``method="shared_prefix"`` (the
default, ``train/sampling/shared_prefix.py``: each prompt is prefilled once and its cache forked to its ``n`` answers) and
``method="repeat"`` (``model.generate`` over ``n`` copies of each prompt, which prefills each copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from selfrank.errors import UserError
from selfrank.ranking.engine import stable_seed
from selfrank.train.models.causal_lm import prompt_token_ids, stop_token_ids
from selfrank.train.sampling.row_sampler import RowSeededSampler
from selfrank.train.sampling.shared_prefix import decode_shared_prefix

METHODS = ("shared_prefix", "repeat")


@dataclass
class Generation:
    query_ids: torch.Tensor  # (B, P) left-padded prompt ids, B = len(prompts) * n
    query_mask: torch.Tensor  # (B, P) 1 for prompt tokens
    response_ids: torch.Tensor  # (B, R) right-padded with pad_token_id; includes the EOS when produced
    response_mask: torch.Tensor  # (B, R) 1 for real response tokens (incl. EOS)
    texts: list[str]  # decoded responses, special tokens skipped, stripped
    ended: torch.Tensor  # (B,) bool: True if a stop token (EOS) was produced
    logp: torch.Tensor | None = None  # (B, R) with record=True: log-prob of each token under softmax(logits / T)
    entropy: torch.Tensor | None = None  # (B, R) with record=True: entropy of softmax(logits / T) at each step

    def __len__(self) -> int:
        return len(self.texts)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(ids, mask)`` long tensors."""
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def response_mask_after_eos(response_ids: torch.Tensor,
                            eos_id: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, ended)``: mask is 1 up to and including the first EOS (any of ``eos_id`` when a list;
    all ones if none)."""
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=response_ids.dtype)
    is_eos = torch.isin(response_ids, stops.to(response_ids.device))
    ended = is_eos.any(dim=1)
    # Number of EOS tokens strictly before each position; a position is real while that count is 0.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).long(), ended


def prompt_budget(model, max_new_tokens: int) -> int | None:
    """Prompt tokens that fit beside ``max_new_tokens`` in the model's context (long SQuAD contexts
    lose their oldest tokens); None when the model states no limit."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if limit <= max_new_tokens:
        raise UserError(f"max_new_tokens: {max_new_tokens} leaves no room for the prompt in a {limit}-token model")
    return limit - max_new_tokens


def answer_seeds(seeds: list[int] | None, seed: int | None, rows: int) -> list[int]:
    """One sampling seed per answer: ``seeds`` as given, else derived from ``seed`` and the row, else
    drawn from torch's global stream."""
    if seeds is not None:
        if len(seeds) != rows:
            raise ValueError(f"generate: {len(seeds)} seeds for {rows} answers")
        return [int(s) for s in seeds]
    if seed is not None:
        return [stable_seed("generate", seed, row) for row in range(rows)]
    return torch.randint(0, 2 ** 62, (rows,)).tolist()


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, n: int = 1,
             do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 32,
             seed: int | None = None, seeds: list[int] | None = None, batch_size: int = 32,
             max_prompt_length: int | None = None, method: str = "shared_prefix", stop_ids: list[int] | None = None,
             record: bool = False, synced: bool = False, generate_kwargs: dict | None = None) -> Generation:
    """Generate ``n`` responses per prompt; sample ``j`` of prompt ``i`` is row ``i * n + j``.

    ``batch_size`` counts sequences (rows) decoded at a time. Prompts are tokenized exactly as
    ``encode_prompt_response`` does and cut from the left to ``max_prompt_length`` tokens. Sampling is
    plain temperature / nucleus sampling (top-k off) so that its distribution matches the log-probs
    PPO recomputes. ``max_prompt_length`` defaults to what fits beside ``max_new_tokens`` in the model's
    context (``prompt_budget``), so long prompts lose their oldest tokens instead of overflowing.
    Answers end at the first of ``stop_ids`` (default: the tokenizer's, ``causal_lm.stop_token_ids``).

    Randomness: each answer draws from its own stream seeded by ``seeds[row]``
    (:class:`~train.sampling.row_sampler.RowSeededSampler` semantics), so an answer depends only on its prompt
    and seed, whatever else shares its batch. Without ``seeds``, ``seed`` derives them from the row
    index (reproducible for the same inputs); with neither they come from torch's global stream.
    Both methods draw the same answers from the same seeds (up to float round-off in the logits).

    ``record``: also return each token's log-prob and the step's entropy under softmax(logits / T)
    (``Generation.logp`` / ``entropy``; under ``repeat`` only when sampling with per-answer seeds).
    ``synced``: every process runs the same number of forwards (ZeRO-3 with sharded weights).
    The model runs in eval mode (dropout off) under ``no_grad``; its previous mode is restored.
    ``generate_kwargs`` go to every ``model.generate`` call of ``method="repeat"`` as they are.
    """
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n, batch_size and max_new_tokens must be >= 1")
    if method not in METHODS:
        raise ValueError(f"generate: method must be one of {METHODS}, got {method!r}")
    if generate_kwargs and method != "repeat":
        raise ValueError("generate: generate_kwargs only apply to method='repeat'")
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None:
        raise ValueError("the tokenizer needs a pad and an EOS token (see train.models.causal_lm.load_causal_lm)")
    stops = [int(s) for s in stop_ids] if stop_ids else stop_token_ids(tokenizer)
    if max_prompt_length is None:
        max_prompt_length = prompt_budget(model, max_new_tokens)
    distinct = []
    for prompt in prompts:
        ids = prompt_token_ids(tokenizer, prompt)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids = ids[len(ids) - max_prompt_length:]
        distinct.append(ids)
    prompt_ids, prompt_mask = left_pad(distinct, pad_id)
    query_ids, query_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
    rows = len(prompts) * n
    if not rows:
        if synced and method == "shared_prefix":  # nothing to draw, but the other processes' forwards need ours
            decode_shared_prefix(model, prompt_ids[:0], prompt_mask[:0], n=n, seeds=None, max_new_tokens=max_new_tokens,
                                 stop_ids=stops, pad_id=pad_id, synced=True)
        empty = torch.zeros((0, 0), dtype=torch.long)
        recorded = torch.zeros((0, 0)) if record else None
        return Generation(query_ids[:0], query_mask[:0], empty, empty, [], torch.zeros(0, dtype=torch.bool),
                          recorded, recorded)
    row_seeds = answer_seeds(seeds, seed, rows) if do_sample else None

    if method == "shared_prefix":
        decoded = decode_shared_prefix(model, prompt_ids, prompt_mask, n=n, seeds=row_seeds,
                                       max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=pad_id,
                                       temperature=temperature, top_p=top_p,
                                       max_rows=batch_size, record=record, synced=synced)
        response_ids, response_mask, ended = decoded.response_ids, decoded.response_mask, decoded.ended
        logp, entropy = decoded.logp, decoded.entropy
    else:
        response_ids, logp, entropy = _generate_repeated(
            model, tokenizer, query_ids, query_mask, row_seeds=row_seeds, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, batch_size=batch_size, stops=stops, record=record,
            generate_kwargs={**(generate_kwargs or {}), **({"synced_gpus": True} if synced else {})})
        response_mask, ended = response_mask_after_eos(response_ids, stops)
        response_ids = response_ids.masked_fill(response_mask == 0, pad_id)
        if record:
            logp, entropy = (t.masked_fill(response_mask == 0, 0.0) for t in (logp, entropy))
    texts = [t.strip() for t in tokenizer.batch_decode(
        [row[mask.bool()].tolist() for row, mask in zip(response_ids, response_mask)], skip_special_tokens=True)]
    return Generation(query_ids, query_mask, response_ids, response_mask, texts, ended, logp, entropy)


def _generate_repeated(model, tokenizer, query_ids, query_mask, *, row_seeds, temperature, top_p,
                       max_new_tokens, batch_size, stops, record, generate_kwargs):
    """``model.generate`` over the repeated rows, ``batch_size`` rows per call: ``(response_ids, logp, entropy)``,
    the ids as generated (not yet cut after the stop token). Sampling (``row_seeds``) goes through
    :class:`RowSeededSampler`, which leaves one finite score per row that greedy decoding then takes."""
    pad_id = tokenizer.pad_token_id
    if record and row_seeds is None:
        raise ValueError("generate: record=True under method='repeat' needs sampling")
    if row_seeds is not None and "logits_processor" in generate_kwargs:
        raise ValueError("generate: per-answer seeded sampling brings its own logits processor")
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops if len(stops) > 1 else stops[0],
                                  pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id, do_sample=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks, logps, entropies = [], [], []
    try:
        with torch.no_grad():
            for start in range(0, len(query_ids), batch_size):
                ids = query_ids[start:start + batch_size].to(device)
                mask = query_mask[start:start + batch_size].to(device)
                kwargs = dict(generate_kwargs)
                if row_seeds is not None:
                    sampler = RowSeededSampler(row_seeds[start:start + batch_size], temperature, top_p, record)
                    kwargs["logits_processor"] = LogitsProcessorList([sampler])
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config, **kwargs)
                chunk = out[:, ids.shape[1]:].cpu()
                chunks.append(chunk)
                if record:
                    lp, ent = sampler.recorded(chunk.shape[1])
                    logps.append(lp.float().cpu())
                    entropies.append(ent.float().cpu())
    finally:
        model.train(was_training)

    width = max(1, max(c.shape[1] for c in chunks))
    response_ids = torch.full((len(query_ids), width), pad_id, dtype=torch.long)
    logp = torch.zeros((len(query_ids), width)) if record else None
    entropy = torch.zeros((len(query_ids), width)) if record else None
    offset = 0
    for i, chunk in enumerate(chunks):
        response_ids[offset:offset + chunk.shape[0], :chunk.shape[1]] = chunk
        if record:
            logp[offset:offset + chunk.shape[0], :chunk.shape[1]] = logps[i]
            entropy[offset:offset + chunk.shape[0], :chunk.shape[1]] = entropies[i]
        offset += chunk.shape[0]
    return response_ids, logp, entropy
