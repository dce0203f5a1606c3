"""PPO rollouts: sample a batch of answers, score them, and gather every process's share.

``collect_rollout`` samples ``ppo.samples_per_prompt`` answers for each of this process's prompts (each
answer seeded by its place in the global batch, :func:`row_seeds`; ``ppo.sampler`` picks the decoder,
both give the same answers), then, without gradients, computes
the reference's log-probs, the reward model's score and the critic's values; ``gather_rollout`` joins
the shares in rank order, so every process holds the global batch, laid out as a one-process run's.
``response_forward`` is the one forward the update repeats (actor logits and critic values).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from selfrank.ranking.engine import stable_seed
from selfrank.train import dist
from selfrank.train.config import PPOConfig
from selfrank.train.models.masks import first_shared_column, position_ids_from_mask
from selfrank.train.rl.ppo_math import entropy_from_logits, logprobs_from_logits
from selfrank.train.sampling.generation import generate


@dataclass
class Rollout:
    """One batch of episodes, everything on the response positions ``(B, R)`` unless noted."""
    input_ids: torch.Tensor  # (B, P + R) left-padded query + right-padded response
    attention_mask: torch.Tensor  # (B, P + R)
    response_ids: torch.Tensor
    mask: torch.Tensor  # 1 on real response tokens (the EOS included)
    ended: torch.Tensor  # (B,) the answer ended with EOS
    logp: torch.Tensor  # actor log-probs at sampling time (at the sampling temperature)
    ref_logp: torch.Tensor  # reference log-probs (same temperature)
    values: torch.Tensor  # critic values of the state before each response token
    raw_score: torch.Tensor  # (B,) RM output (str_direct: the answer's TextRank centrality in its group)
    score: torch.Tensor  # (B,) normalised RM score (str_direct: the centrality standardised within its group)
    entropy: torch.Tensor  # (B,) sum over each answer's tokens of the sampling distribution's entropy
    texts: list[str]

    @property
    def query_length(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]

    @property
    def mean_entropy(self) -> float:
        """Mean per-token entropy of the sampling distribution over the batch's real tokens."""
        return float(self.entropy.sum() / self.mask.sum().clamp_min(1))


def row_seeds(seed: int, step: int, start: int, end: int, samples_per_prompt: int) -> list[int]:
    """One sampling seed per answer of prompts ``start..end-1`` of the step's global batch."""
    return [stable_seed("ppo-sample", seed, step, b, j) for b in range(start, end) for j in range(samples_per_prompt)]


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """Logits predicting each response token, ``(B, R, V)``.

    Trick (speed): the last token is never an input (nothing is predicted after it), and only the R
    positions that predict response tokens go through the LM head (``logits_to_keep``); the prompt's
    positions would cost as much vocabulary projection again for nothing. Positions come from the mask
    so that left padding does not shift them (the same position ids ``generate`` used while sampling).
    """
    out = model(**_shifted_inputs(input_ids, attention_mask, response_length))
    return out.logits


def _shifted_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> dict:
    input_ids, attention_mask = input_ids[:, :-1], attention_mask[:, :-1]
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask), "use_cache": False,
            "logits_to_keep": response_length}


def response_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                     values_only: bool = False, policy_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Actor logits ``(B, R, V)`` and critic values ``(B, R)`` for the response positions, in ONE call of
    the (prepared) ``PolicyAndValue`` module: DDP and DeepSpeed only see calls of the wrapped module.
    The critic reads the same inputs (the last token is not an input either). ``values_only``: the
    actor does not run and the logits are None; ``policy_only``: the critic does not run and the values
    are None (the update's separate passes, one process without DeepSpeed only)."""
    logits, values = model(**_shifted_inputs(input_ids, attention_mask, response_length), values_only=values_only,
                           policy_only=policy_only)
    return logits, None if values is None else values[:, -response_length:]


@dataclass
class Minibatch:
    """Rows of a rollout for one PPO update, on ``(b, r)`` response positions unless noted."""
    input_ids: torch.Tensor  # (b, p + r)
    attention_mask: torch.Tensor  # (b, p + r)
    response_ids: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def response_length(self) -> int:
        return self.response_ids.shape[1]


def minibatch(ro: Rollout, idx: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor) -> Minibatch:
    """Rows ``idx`` of ``ro`` without the columns that are padding in every one of them.

    Trick (speed and memory): the rollout is padded to the longest prompt and the longest answer of the
    whole batch; a minibatch's rows are often shorter on both sides. Left columns that are padding in all
    its rows change no real token's output (they are masked out, and positions come from the mask), and
    response columns after every row's last token are read by no loss and, the attention being causal,
    by no earlier position; so both are cut before the forward, which then costs what its rows need."""
    attention_mask, mask = ro.attention_mask[idx], ro.mask[idx]
    query = ro.query_length
    first = first_shared_column(attention_mask[:, :query])
    real = mask.any(0).nonzero()
    length = int(real[-1]) + 1 if real.numel() else 1
    end = query + length
    return Minibatch(input_ids=ro.input_ids[idx, first:end], attention_mask=attention_mask[:, first:end],
                     response_ids=ro.response_ids[idx, :length], mask=mask[:, :length],
                     logp=ro.logp[idx, :length], values=ro.values[idx, :length],
                     advantages=advantages[idx, :length], returns=returns[idx, :length])


def logprobs_at_sampling(cfg: PPOConfig, model, accelerator) -> bool:
    """Whether the rollout keeps the sampler's log-probs (``ppo.rollout_logprobs``) instead of a forward.

    ``auto``: yes for fp32 weights without autocast. Why not otherwise: in 16-bit compute (autocast, or
    half weights) ``generate``'s step-by-step forward with cached keys/values and the update's one
    forward over the whole sequence differ by far more than round-off, so the first ratio would not
    start at 1."""
    if cfg.rollout_logprobs != "auto":
        return cfg.rollout_logprobs == "sampling"
    policy = dist.unwrap(model, accelerator).policy
    return (getattr(accelerator, "mixed_precision", "no") == "no"
            and next(policy.parameters()).dtype == torch.float32)


@torch.no_grad()
def collect_rollout(model, ref, rm, tokenizer, prompts: list[str], cfg: PPOConfig, seeds: list[int],
                    accelerator=None) -> Rollout:
    """Sample and score this process's share of a batch (no gradients anywhere).

    ``model`` is the (prepared) ``PolicyAndValue``; ``ref`` and ``rm`` the (prepared) frozen models
    (``rm`` None: no reward model, the scores are left at 0 for the caller to fill);
    ``seeds`` one sampling seed per answer (:func:`row_seeds`). Collective under a launcher."""
    acc = accelerator if accelerator is not None else dist.get_accelerator()
    k = cfg.samples_per_prompt
    gather = cfg.gather_for_generation
    from_sampling = logprobs_at_sampling(cfg, model, acc)
    with dist.gathered_for_generation(model, acc, gather=gather) as inner:
        gen = generate(inner.policy, tokenizer, prompts, n=k, temperature=cfg.temperature, top_p=cfg.top_p,
                       max_new_tokens=cfg.max_new_tokens, seeds=seeds, batch_size=max(1, len(prompts) * k),
                       method=cfg.sampler, record=from_sampling,
                       synced=bool(dist.generation_kwargs(model, acc, gather=gather).get("synced_gpus")))
    device = acc.device
    response_ids = gen.response_ids.to(device)
    mask = gen.response_mask.to(device)
    input_ids = torch.cat([gen.query_ids.to(device), response_ids], dim=1)
    attention_mask = torch.cat([gen.query_mask.to(device), mask], dim=1)
    length = response_ids.shape[1]

    if from_sampling:
        # Trick (speed): the log-probs the sampler saw while drawing, so the actor runs no second forward
        # over the batch; they differ from the update's forward only by float round-off (cached keys).
        logp, token_entropy = gen.logp.to(device), gen.entropy.to(device)  # 0 after each answer's end
        _, values = response_forward(model, input_ids, attention_mask, length, values_only=True)
    else:
        # Log-probs recomputed by a plain forward at the sampling temperature (logits / T), the same
        # computation the update will repeat, so the first ratio is exactly 1 (no generate-vs-forward drift).
        logits, values = response_forward(model, input_ids, attention_mask, length)
        logits = logits.float() / cfg.temperature
        logp = logprobs_from_logits(logits, response_ids)
        token_entropy = entropy_from_logits(logits)
        del logits
    entropy = (token_entropy * mask).sum(1)
    ref_logp = logprobs_from_logits(response_logits(ref, input_ids, attention_mask, length), response_ids,
                                    cfg.temperature)
    if rm is not None:
        # The RM reads the last real token: the EOS when the answer ended, as in its training texts.
        raw = rm(input_ids, attention_mask)
        score = dist.unwrap(rm, acc).normalized(raw)
    else:
        # No reward model (str_direct): the caller fills both once the whole batch's groups are ranked.
        raw = score = torch.zeros(input_ids.shape[0], device=device)
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, response_ids=response_ids, mask=mask,
                   ended=gen.ended.to(device), logp=logp, ref_logp=ref_logp, values=values.float(),
                   raw_score=raw.float(), score=score.float(), entropy=entropy, texts=gen.texts)


def _pad_to(tensor: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if missing <= 0:
        return tensor
    pad = torch.full((tensor.shape[0], missing), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor] if left else [tensor, pad], dim=1)


def gather_rollout(local: Rollout, accelerator, pad_id: int) -> Rollout:
    """All processes' rollouts concatenated in rank order (the global batch's order). Collective.

    Queries are left-padded and responses right-padded to the widest across processes, the layout a
    one-process run over the whole batch has. Identity on one process."""
    acc = accelerator
    if acc.num_processes == 1:
        return local
    query_len = local.query_length
    widths = torch.tensor([query_len, local.response_ids.shape[1]], device=acc.device)
    query_width, response_width = (int(w) for w in acc.gather(widths.unsqueeze(0)).max(0).values)

    def whole(tensor: torch.Tensor) -> torch.Tensor:
        return acc.gather(tensor.contiguous())

    query_ids = _pad_to(local.input_ids[:, :query_len], query_width, pad_id, left=True)
    query_mask = _pad_to(local.attention_mask[:, :query_len], query_width, 0, left=True)
    response = {name: _pad_to(getattr(local, name), response_width, value, left=False)
                for name, value in (("response_ids", pad_id), ("mask", 0), ("logp", 0.0), ("ref_logp", 0.0),
                                    ("values", 0.0))}
    response_ids, mask = whole(response["response_ids"]), whole(response["mask"])
    return Rollout(input_ids=torch.cat([whole(query_ids), response_ids], dim=1),
                   attention_mask=torch.cat([whole(query_mask), mask], dim=1), response_ids=response_ids,
                   mask=mask, ended=whole(local.ended), logp=whole(response["logp"]),
                   ref_logp=whole(response["ref_logp"]), values=whole(response["values"]),
                   raw_score=whole(local.raw_score), score=whole(local.score), entropy=whole(local.entropy),
                   texts=dist.gather_lists(local.texts))
