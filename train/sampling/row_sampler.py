"""Per-answer seeded token picking: one seeded random stream per answer, so that an answer depends only
on its prompt and its seed (not on which other answers share its batch, nor on the number of processes).

:func:`pick_tokens` is the one place where a token is chosen from a row of logits (temperature, top-p
nucleus, inverse CDF with the row's own uniform number, or greedy argmax), optionally recording the
picked token's log-probability and the entropy of softmax(logits / T). Both the ``generate()``
logits processor :class:`RowSeededSampler` and the prefix-sharing decoder (``train/sampling/shared_prefix.py``) use it, so
the two draw identical tokens from identical logits.
"""
from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor


def pick_tokens(logits: torch.Tensor, uniform: torch.Tensor | None, temperature: float, top_p: float,
                record: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(picked (B,), logp (B,) | None, entropy (B,) | None)`` for one step of ``B`` rows.

    ``uniform``: one U[0, 1) number per row (float64), or None for greedy decoding (argmax). Sampling
    draws from softmax(logits / T) cut to the top-p nucleus (top-k off): the token where the row's CDF
    first reaches ``(1 - u) * total``; 1 - u lies in (0, 1], so a zero-probability token is never picked.
    With ``record`` the log-probability of the picked token and the entropy are those of the whole
    softmax(logits / T) (before the nucleus cut), which is what the PPO update recomputes.
    """
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    logp_all = torch.log_softmax(scores, dim=-1) if record else None
    if uniform is None:
        picked = scores.argmax(-1, keepdim=True)
    else:
        probs = torch.softmax(scores, dim=-1)
        if top_p < 1.0:
            probs = probs * nucleus(probs, top_p)
        cdf = probs.cumsum(-1)
        target = ((1.0 - uniform).to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
        picked = torch.searchsorted(cdf, target).clamp_(max=scores.shape[-1] - 1)
    if not record:
        return picked.squeeze(1), None, None
    logp = logp_all.gather(1, picked).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return picked.squeeze(1), logp, entropy


NUCLEUS_CANDIDATES = 256  # top tokens searched for the nucleus before falling back to a full sort


def _nucleus_in(values: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of ``values`` (probabilities sorted descending) are in the nucleus: a token stays while the
    mass of the tokens above it is below ``top_p`` (so the top token always stays)."""
    return values.cumsum(-1) - values < top_p


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``(B, V)`` bool: the top-p nucleus of each row, the set ``TopPLogitsWarper`` keeps (top-k off; the
    mass sums may round differently at the nucleus' edge, by a token of negligible probability).

    Trick (speed): a full sort of a 49k-token vocabulary per row per step costs about as much as the LM
    head; the nucleus of a trained model is usually a few dozen tokens, so the top
    ``NUCLEUS_CANDIDATES`` are enough whenever their mass reaches ``top_p``, and only the other rows
    (flat distributions) are sorted in full."""
    keep = torch.zeros_like(probs, dtype=torch.bool)
    values, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    covered = values.sum(-1) >= top_p
    keep.scatter_(1, order, _nucleus_in(values, top_p) & covered.unsqueeze(1))
    flat = (~covered).nonzero().squeeze(1)
    if flat.numel():
        values, order = probs[flat].sort(dim=-1, descending=True)
        keep[flat] = torch.zeros_like(values, dtype=torch.bool).scatter_(1, order, _nucleus_in(values, top_p))
    return keep


class RowUniforms:
    """One seeded CPU stream per row; :meth:`next` gives each row's next U[0, 1) number (float64).

    Trick (speed): each row's generator fills a block of uniforms at once instead of one draw per row
    per token; a block of n draws is the same numbers as n single draws, so samples do not change.
    """

    BLOCK = 32  # uniforms drawn per row at a time

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self._block = torch.empty(0)
        self._step = 0

    def __len__(self) -> int:
        return len(self.generators)

    def next(self) -> torch.Tensor:
        column = self._step % self.BLOCK
        if column == 0:
            self._block = torch.stack([torch.rand(self.BLOCK, generator=g, dtype=torch.float64)
                                       for g in self.generators])
        self._step += 1
        return self._block[:, column]


class RowSeededSampler(LogitsProcessor):
    """Temperature / nucleus sampling where row ``i`` draws from its own seeded stream ``seeds[i]``.

    Why: a batched ``generate`` draws all rows from one random stream, so an answer depends on which
    other rows share its batch, and a run on N processes would sample differently from one process.
    Here each row's token is picked by :func:`pick_tokens` with one uniform number from its own
    generator per step, and returned as the only finite score; ``generate`` runs greedy, which then
    takes exactly that token. The distribution is softmax(logits / T) cut to the top-p nucleus, the
    same as ``generate``'s own sampling (top-k off). The generators live on the CPU.

    With ``record=True`` it also keeps, per step, each row's log-probability of the picked token and
    the entropy under softmax(logits / T) (the whole distribution, as the update computes them), read
    back with :meth:`recorded`.
    """

    BLOCK = RowUniforms.BLOCK

    def __init__(self, seeds: list[int], temperature: float, top_p: float, record: bool = False):
        self.uniforms = RowUniforms(seeds)
        self.temperature = temperature
        self.top_p = top_p
        self.record = record
        self._logp: list[torch.Tensor] = []
        self._entropy: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.uniforms):
            raise ValueError(f"RowSeededSampler: {scores.shape[0]} rows but {len(self.uniforms)} seeds")
        picked, logp, entropy = pick_tokens(scores, self.uniforms.next(), self.temperature, self.top_p, self.record)
        if self.record:
            self._logp.append(logp)
            self._entropy.append(entropy)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, picked.unsqueeze(1), 0.0)

    def recorded(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logp, entropy)``, each ``(B, steps)``: the first ``steps`` recorded tokens of every row."""
        if not self.record or len(self._logp) < steps:
            raise RuntimeError(f"RowSeededSampler recorded {len(self._logp)} steps, {steps} asked for")
        return torch.stack(self._logp[:steps], 1), torch.stack(self._entropy[:steps], 1)
