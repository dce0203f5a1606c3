"""Batched sampling / greedy decoding that returns both the texts and the token tensors.

The tensors are what PPO needs (query and response ids with masks); the texts are what ranking and
evaluation need. Everything after a sequence's first EOS is padding, so the response mask covers the
real tokens and the EOS itself, and nothing that ``model.generate`` may have appended after it. "EOS" is
any of the tokenizer's stop ids (``causal_lm.stop_token_ids``: a chat template's end of turn, then EOS).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from selfrank.errors import UserError

from selfrank.train.models.causal_lm import prompt_token_ids, stop_token_ids


@dataclass
class Generation:
    query_ids: torch.Tensor  # (B, P) left-padded prompt ids, B = len(prompts) * n
    query_mask: torch.Tensor  # (B, P) 1 for prompt tokens
    response_ids: torch.Tensor  # (B, R) right-padded with pad_token_id; includes the EOS when produced
    response_mask: torch.Tensor  # (B, R) 1 for real response tokens (incl. EOS)
    texts: list[str]  # decoded responses, special tokens skipped, stripped
    ended: torch.Tensor  # (B,) bool: True if EOS was produced

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


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed sampling without disturbing the caller's random streams."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def prompt_budget(model, max_new_tokens: int) -> int | None:
    """Prompt tokens that fit beside ``max_new_tokens`` in the model's context (long SQuAD contexts
    lose their oldest tokens); None when the model states no limit."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if limit <= max_new_tokens:
        raise UserError(f"max_new_tokens: {max_new_tokens} leaves no room for the prompt in a {limit}-token model")
    return limit - max_new_tokens


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *, n: int = 1,
             do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 32,
             seed: int | None = None, batch_size: int = 32, max_prompt_length: int | None = None,
             generate_kwargs: dict | None = None) -> Generation:
    """Generate ``n`` responses per prompt; sample ``j`` of prompt ``i`` is row ``i * n + j``.

    ``batch_size`` counts sequences (rows) per ``model.generate`` call. Prompts are tokenized exactly as
    ``encode_prompt_response`` does and cut from the left to ``max_prompt_length`` tokens. Sampling is
    plain temperature / nucleus sampling (top-k off) so that its distribution matches the log-probs
    PPO recomputes. ``max_prompt_length`` defaults to what fits beside ``max_new_tokens`` in the model's
    context (``prompt_budget``), so long prompts lose their oldest tokens instead of overflowing.
    With ``seed`` the result is reproducible for the same inputs and batch size.
    The model runs in eval mode (dropout off) under ``no_grad``; its previous mode is restored.
    ``generate_kwargs`` go to every ``model.generate`` call as they are (``logits_processor``,
    ``synced_gpus``...).
    """
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n, batch_size and max_new_tokens must be >= 1")
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None:
        raise ValueError("the tokenizer needs a pad and an EOS token (see train.models.load_causal_lm)")
    stops = stop_token_ids(tokenizer)
    if max_prompt_length is None:
        max_prompt_length = prompt_budget(model, max_new_tokens)
    rows = []
    for prompt in prompts:
        ids = prompt_token_ids(tokenizer, prompt)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids = ids[len(ids) - max_prompt_length:]
        rows.extend([ids] * n)
    query_ids, query_mask = left_pad(rows, pad_id)
    if not rows:
        empty = torch.zeros((0, 0), dtype=torch.long)
        return Generation(query_ids[:0], query_mask[:0], empty, empty, [], torch.zeros(0, dtype=torch.bool))

    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else \
        dict(do_sample=False)
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops[0] if len(stops) == 1 else stops,
                                  pad_token_id=pad_id,
                                  bos_token_id=tokenizer.bos_token_id, **sampling)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad(), _seeded(seed, device):
            for start in range(0, len(rows), batch_size):
                ids = query_ids[start:start + batch_size].to(device)
                mask = query_mask[start:start + batch_size].to(device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config,
                                     **(generate_kwargs or {}))
                chunks.append(out[:, ids.shape[1]:].cpu())
    finally:
        model.train(was_training)

    width = max(1, max(c.shape[1] for c in chunks))
    response_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    offset = 0
    for chunk in chunks:
        response_ids[offset:offset + chunk.shape[0], :chunk.shape[1]] = chunk
        offset += chunk.shape[0]
    response_mask, ended = response_mask_after_eos(response_ids, stops)
    response_ids = response_ids.masked_fill(response_mask == 0, pad_id)
    texts = [t.strip() for t in tokenizer.batch_decode(
        [row[mask.bool()].tolist() for row, mask in zip(response_ids, response_mask)], skip_special_tokens=True)]
    return Generation(query_ids, query_mask, response_ids, response_mask, texts, ended)
