"""Pixel decoder: ViQ codes back to pixels at the image's native resolution.

The reference leaves its decoder unreleased; ours reads the head's dequantized sub-token
features (one per 8x8 pixels, after `from_code`), lays them on the fine 2H x 2W grid,
runs a packed bidirectional transformer with 2D RoPE over that grid (attention within
each image, like the encoder), and predicts each 8x8x3 block of pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from viq_megatron.config import DecoderConfig
from viq_megatron.data.code_layout import patch_major, raster_order  # noqa: F401 - patch_major: re-exported
from viq_megatron.data.packing import PackedImages
from viq_megatron.models.specs import transformer_block
from viq_megatron.models.viq_head import grid_rope_angles
from viq_megatron.models.vit import bidirectional_transformer_config, packed_params, row_blocked

CODE_PIXELS = 8  # one code per 8x8 pixels


class PixelDecoder(MegatronModule):
    def __init__(
        self,
        cfg: DecoderConfig,
        subtoken_size: int,
        tensor_parallel: int,
        params_dtype: torch.dtype,
        impl: str = "local",
    ):
        # 2D RoPE lives in our packed attention: local layers (or standalone ones, see specs.py).
        config = bidirectional_transformer_config(
            cfg.hidden_size,
            cfg.num_layers,
            cfg.num_attention_heads,
            cfg.ffn_hidden_size,
            cfg.layernorm_epsilon,
            tensor_parallel,
            params_dtype,
            impl,
        )
        super().__init__(config=config)
        self.cfg = cfg
        self.input = torch.nn.Linear(subtoken_size, cfg.hidden_size, dtype=params_dtype)
        self.blocks = transformer_block(config, impl)
        self.output = torch.nn.Linear(cfg.hidden_size, CODE_PIXELS * CODE_PIXELS * 3, dtype=params_dtype)

    @property
    def layers(self):
        """Megatron-Core's schedules walk `<model>.decoder.layers` of whatever they run."""
        return self.blocks.layers

    def forward(self, subtokens: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """Sub-token features [4N, s], patch-major per image, with patch grids [images, 2]
        -> pixel blocks [4N, 8*8*3] in raster order of each image's fine grid."""
        # The layout is host arithmetic on the (host) grids: nothing here waits for the device.
        patch_grids = grids.tolist()
        fine_grids = [(2 * gh, 2 * gw) for gh, gw in patch_grids]
        bounds = [0]
        order = []
        for (gh, gw), (fh, fw) in zip(patch_grids, fine_grids):
            order.append(raster_order(gh, gw) + bounds[-1])
            bounds.append(bounds[-1] + fh * fw)
        x = row_blocked(self.input, subtokens[torch.cat(order).to(subtokens.device, non_blocking=True)])
        head_dim = self.cfg.hidden_size // self.cfg.num_attention_heads
        packed = packed_params(bounds, x.device, grid_rope_angles(fine_grids, head_dim, self.cfg.rope_base))
        h = row_blocked(
            lambda rows: self.blocks(
                hidden_states=rows.unsqueeze(1), attention_mask=None, packed_seq_params=packed
            ).squeeze(1),
            x,
        )
        return row_blocked(self.output, h)


def drawn_and_original(
    blocks: torch.Tensor, images: PackedImages, patch: int, mean: torch.Tensor, std: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The decoder's pixel blocks of packed images and those images, each as [3, H, W] in [0, 1]."""
    bounds = [4 * b for b in images.cu_seqlens.tolist()]
    scale, shift = std[:, None, None], mean[:, None, None]
    drawn, original = [], []
    for k, grid in enumerate(images.grids.tolist()):
        drawn.append(blocks_to_image(blocks[bounds[k] : bounds[k + 1]], grid).float() * scale + shift)
        patches = images.patches[images.cu_seqlens[k] : images.cu_seqlens[k + 1]].to(drawn[-1].device)
        original.append(patches_to_image(patches, grid, patch).float() * scale + shift)
    return drawn, original


def pixel_losses(drawn: list[torch.Tensor], original: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums over images: L1 over every pixel value, 1 - SSIM and PSNR (reported, not trained) per image."""
    return {
        "l1": sum((d - o).abs().sum() for d, o in zip(drawn, original)),
        "ssim": sum(1 - ssim(d, o) for d, o in zip(drawn, original)),
        "psnr": sum(psnr(d.clamp(0, 1), o).detach() for d, o in zip(drawn, original)),
    }


def blocks_to_image(blocks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster-ordered 8x8x3 blocks of one image -> [3, H, W]."""
    fh, fw = grid[0] * 2, grid[1] * 2
    p = CODE_PIXELS
    return blocks.reshape(fh, fw, p, p, 3).permute(4, 0, 2, 1, 3).reshape(3, fh * p, fw * p)


def patches_to_image(patches: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Encoder input patches [(gh*gw), p*p*3] of one image -> [3, H, W] (normalised pixels)."""
    gh, gw = grid
    return patches.reshape(gh, gw, patch, patch, 3).permute(4, 0, 2, 1, 3).reshape(3, gh * patch, gw * patch)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of two images [3, H, W] (11x11 Gaussian window, sigma 1.5)."""
    coords = torch.arange(11, dtype=torch.float32, device=x.device) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t[None], window, padding=5, groups=3)[0]

    x, y = x.float(), y.float()
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.mean()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    mse = F.mse_loss(x.float(), y.float())
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))
