"""Packing variable-length sequences into fixed token budgets.

Images of many sizes share one encoder sequence; `cu_seqlens` marks where each image
starts, and attention never crosses those boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from viq_megatron.data.images import NativeImage


def greedy_pack(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped so each group's total length fits `budget`.

    Deterministic (ties keep input order); each group lists its indices in input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > budget:
            raise ValueError(f"sequence {i} has {lengths[i]} tokens, over the pack budget of {budget}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """The longest sequence of a pack bounded by `cu_seqlens` (reads it on the host)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


@dataclass
class PackedImages:
    """Several native-resolution images in one sequence of patches."""

    patches: torch.Tensor  # [total_patches, patch * patch * 3]
    grids: torch.Tensor  # [num_images, 2] (grid_h, grid_w), int64
    cu_seqlens: torch.Tensor  # [num_images + 1], int32, cumulative patch counts
    sources: list[str]

    @classmethod
    def from_images(cls, images: Sequence[NativeImage]) -> PackedImages:
        lengths = torch.tensor([0] + [im.num_patches for im in images])
        return cls(
            patches=torch.cat([im.patches for im in images]),
            grids=torch.tensor([im.grid for im in images], dtype=torch.int64).reshape(-1, 2),
            cu_seqlens=torch.cumsum(lengths, 0).to(torch.int32),
            sources=[im.source for im in images],
        )

    @property
    def num_images(self) -> int:
        return len(self.sources)

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def max_seqlen(self) -> int:
        return max_seqlen(self.cu_seqlens)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PackedImages:
        return PackedImages(
            self.patches.to(device=device, dtype=dtype), self.grids, self.cu_seqlens.to(device), self.sources
        )

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per-image views of a [total_patches, ...] tensor."""
        bounds = self.cu_seqlens.tolist()
        return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
