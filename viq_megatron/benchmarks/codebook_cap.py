"""The codebook usage that images leave room for: the PCA-5 cap a tokenizer's usage is read against.

A ViQ code stands for an 8x8-pixel block (2x2 codes per 16x16 patch) and is one point of the FSQ
grid (5 dimensions, 15,360 points, for the 16k book). The cap codes each block from its own
pixels as evenly as that grid allows: the blocks' top principal components, one per FSQ
dimension (the most varied on the dimension with the most levels), each cut at its quantiles
into as many equally filled bins as the dimension has levels. Flat images give few distinct
blocks and so few codes whatever the tokenizer; this measures how few.
"""

from __future__ import annotations

import math

import torch

from viq_megatron.data.images import NativeImage
from viq_megatron.models.codebook import codebook_summary
from viq_megatron.models.quantizers import FSQ


def pixel_blocks(image: NativeImage, patch: int) -> torch.Tensor:
    """The image's 8x8 (patch / 2) pixel blocks, one per code: [4 * patches, (patch / 2)^2 * 3]."""
    half = patch // 2
    pixels = image.patches.reshape(-1, 2, half, 2, half, 3)  # patch rows and columns split in two
    return pixels.permute(0, 1, 3, 2, 4, 5).reshape(-1, half * half * 3).float()


def pca_cap_codes(blocks: torch.Tensor, fsq: FSQ) -> torch.Tensor:
    """Each block's code on the FSQ grid [blocks] from its top principal components. Computed on
    the distinct blocks, weighted by how often each occurs: equal blocks get one code."""
    distinct, inverse, counts = torch.unique(blocks, dim=0, return_inverse=True, return_counts=True)
    weights = counts.double()
    centred = distinct.double() - (distinct.double() * weights[:, None]).sum(0) / weights.sum()
    _, _, directions = torch.linalg.svd(centred.T @ (centred * weights[:, None]))  # rows: by variance
    components = centred @ directions[: fsq.dim].T  # [distinct, dims], most varied first
    digits = torch.empty_like(components, dtype=torch.int64)
    by_levels = sorted(range(fsq.dim), key=lambda k: -fsq.levels[k])  # the most levels get the most variance
    for component, dim in enumerate(by_levels):
        order = components[:, component].argsort()
        below = torch.empty_like(order)  # blocks before each distinct block along the component
        below[order] = (weights[order].cumsum(0) - weights[order]).long()
        digits[:, dim] = below * fsq.levels[dim] // len(blocks)  # quantile bins
    basis = torch.tensor([math.prod(fsq.levels[:k]) for k in range(fsq.dim)])  # FSQ's index order
    return (digits * basis).sum(-1)[inverse]


def pca_cap(images: list[NativeImage], patch: int, fsq: FSQ) -> dict:
    """Usage, perplexity and level histograms of the cap's codes over `images`, as the codebook
    summary of written codes gives them."""
    codes = pca_cap_codes(torch.cat([pixel_blocks(image, patch) for image in images]), fsq)
    counts = torch.bincount(codes, minlength=fsq.codebook_size).double()
    return codebook_summary(counts, fsq)
