"""Where an image's ViQ codes sit: raster order on the fine grid vs patch-major.

An image of grid_h x grid_w 16x16 patches has one code per 8x8 pixels, 2 x 2 per patch:
a 2H x 2W fine grid. Token files store the codes in raster order on that grid; the
model reads them patch-major, [patches, 4], each patch's 2x2 codes (row by row).
Pure index bookkeeping (torch only): the data readers and the models share it.
"""

from __future__ import annotations

import torch


def raster_order(grid_h: int, grid_w: int) -> torch.Tensor:
    """Permutation from patch-major sub-tokens ([patch][2x2]) to raster order on the 2H x 2W grid."""
    fine = torch.arange(grid_h * grid_w * 4).reshape(grid_h, grid_w, 2, 2)
    return fine.permute(0, 2, 1, 3).reshape(-1)


def patch_major(raster_codes: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Codes in raster order on the 2H x 2W grid -> [patches, 4], each patch's 2x2 codes."""
    out = torch.empty(grid_h * grid_w * 4, dtype=torch.int64, device=raster_codes.device)
    out[raster_order(grid_h, grid_w).to(raster_codes.device)] = raster_codes.reshape(-1).to(torch.int64)
    return out.reshape(-1, 4)
