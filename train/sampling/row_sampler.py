"""Sampling where every answer draws from its own seeded random stream (1 and N processes agree)."""
from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper


class RowSeededSampler(LogitsProcessor):
    """Temperature / nucleus sampling where row ``i`` draws from its own seeded stream ``seeds[i]``.

    Why: a batched ``generate`` draws all rows from one random stream, so an answer depends on which
    other rows share its batch, and a run on N processes would sample differently from one process.
    Here each row's token is picked by inverse-CDF sampling with one uniform number from its own
    generator per step, and returned as the only finite score; ``generate`` runs greedy, which then
    takes exactly that token. The distribution is softmax(logits / T) cut to the top-p nucleus, the
    same as ``generate``'s own sampling (top-k off). The generators live on the CPU.

    With ``record=True`` it also keeps, per step, each row's log-probability of the picked token and
    the entropy under softmax(logits / T) (the whole distribution, as the update computes them), read
    back with :meth:`recorded`.
    """

    BLOCK = 32  # uniforms drawn per row at a time

    def __init__(self, seeds: list[int], temperature: float, top_p: float, record: bool = False):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = TemperatureLogitsWarper(temperature) if temperature != 1.0 else None
        self.top_p = TopPLogitsWarper(top_p=top_p) if top_p < 1.0 else None
        self.record = record
        self._uniform = torch.empty(0)
        self._step = 0
        self._logp: list[torch.Tensor] = []
        self._entropy: list[torch.Tensor] = []

    def _next_uniform(self) -> torch.Tensor:
        # Trick (speed): each row's generator fills a block of uniforms at once instead of one draw per
        # row per token; a block of n draws is the same numbers as n single draws, so samples do not change.
        column = self._step % self.BLOCK
        if column == 0:
            self._uniform = torch.stack([torch.rand(self.BLOCK, generator=g, dtype=torch.float64)
                                         for g in self.generators])
        self._step += 1
        return self._uniform[:, column]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"RowSeededSampler: {scores.shape[0]} rows but {len(self.generators)} seeds")
        if self.temperature is not None:
            scores = self.temperature(input_ids, scores)
        if self.record:
            logp_all = torch.log_softmax(scores.float(), dim=-1)
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        # 1 - U(0, 1) lies in (0, 1]: the target mass is > 0, so a zero-probability token is never picked.
        uniform = 1.0 - self._next_uniform()
        cdf = probs.cumsum(-1)
        target = (uniform.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
        picked = torch.searchsorted(cdf, target).clamp_(max=probs.shape[-1] - 1)
        if self.record:
            self._logp.append(logp_all.gather(1, picked).squeeze(1))
            self._entropy.append(-(logp_all.exp() * logp_all).sum(-1))
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, picked, 0.0)

    def recorded(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logp, entropy)``, each ``(B, steps)``: the first ``steps`` recorded tokens of every row."""
        if not self.record or len(self._logp) < steps:
            raise RuntimeError(f"RowSeededSampler recorded {len(self._logp)} steps, {steps} asked for")
        return torch.stack(self._logp[:steps], 1), torch.stack(self._entropy[:steps], 1)
