"""Codebook health of the FSQ head: how many codes are used, perplexity, per-dimension levels.

Low usage (codebook collapse) is the classic failure of VQ tokenizers; FSQ resists it,
and these numbers show whether it does here.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from viq_megatron.models.quantizers import FSQ


class CodebookStats:
    def __init__(self, fsq: FSQ):
        self.fsq = fsq
        self.counts = torch.zeros(fsq.codebook_size, dtype=torch.float64)

    def add(self, indices: torch.Tensor) -> None:
        """Counts codes where they are (index_add_, unlike bincount, needs no host synchronisation)."""
        self.counts = self.counts.to(indices.device)
        flat = indices.reshape(-1)
        self.counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    def summary(self) -> dict[str, float | list]:
        """Global (all-reduced) statistics of the codes seen since the last summary; resets."""
        counts = self.counts.to("cuda" if torch.cuda.is_available() else "cpu", copy=True)  # NCCL: device tensors
        if dist.is_initialized():  # tensor-parallel ranks saw the same codes: sum over data parallel only
            dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        self.counts.zero_()
        return codebook_summary(counts.cpu(), self.fsq)


def codebook_summary(counts: torch.Tensor, fsq: FSQ) -> dict[str, float | list]:
    """Usage (share of the codebook seen at least once), perplexity (exp of the code entropy) and
    per-dimension level histograms of code counts [codebook_size]; {} for no codes."""
    total = counts.sum().item()
    if total == 0:
        return {}
    p = counts[counts > 0].double() / total
    digits = fsq.level_digits(torch.arange(fsq.codebook_size))
    histograms = [
        [round(counts[digits[:, k] == level].sum().item() / total, 4) for level in range(levels)]
        for k, levels in enumerate(fsq.levels)
    ]
    return {
        "codebook_usage": (counts > 0).sum().item() / fsq.codebook_size,
        "codebook_perplexity": math.exp(-(p * p.log()).sum().item()),
        "codes_seen": total,
        "level_histograms": histograms,
    }
