"""Codebook health of the FSQ head: how many codes are used, perplexity, per-dimension levels.

Low usage (codebook collapse) is the classic failure of VQ tokenizers; FSQ resists it,
and these numbers show whether it does here.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from viq_megatron.models.quantizers import FSQ


class CodebookStats:
    def __init__(self, fsq: FSQ):
        self.fsq = fsq
        self.counts = torch.zeros(fsq.codebook_size, dtype=torch.float64)

    def add(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.reshape(-1).cpu(), minlength=self.fsq.codebook_size).double()

    def summary(self) -> dict[str, float | list]:
        """Global (all-reduced) statistics of the codes seen since the last summary; resets."""
        from megatron.core import parallel_state

        counts = self.counts.to("cuda" if torch.cuda.is_available() else "cpu", copy=True)  # NCCL: device tensors
        if dist.is_initialized():  # tensor-parallel ranks saw the same codes: sum over data parallel only
            dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        counts = counts.cpu()
        self.counts.zero_()
        total = counts.sum().item()
        if total == 0:
            return {}
        p = counts[counts > 0] / total
        digits = self.fsq.level_digits(torch.arange(self.fsq.codebook_size))
        histograms = [[round(counts[digits[:, k] == level].sum().item() / total, 4) for level in range(levels)]
                      for k, levels in enumerate(self.fsq.levels)]
        return {"codebook_usage": (counts > 0).sum().item() / self.fsq.codebook_size,
                "codebook_perplexity": math.exp(-(p * p.log()).sum().item()),
                "codes_seen": total, "level_histograms": histograms}
