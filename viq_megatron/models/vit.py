"""Native-resolution ViT encoder on Megatron-Core (SigLIP2-style, NaFlex-like).

patches [T, p*p*3] --linear--> + learned position grid resized to each image's grid
--> TransformerBlock over the packed sequence (attention stays within each image)
--> final LayerNorm --> one token per patch [T, hidden].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from viq_megatron.config import EncoderConfig
from viq_megatron.data.packing import PackedImages
from viq_megatron.models.attention import PackedRotaryParams
from viq_megatron.models.specs import common_config_kwargs, transformer_block

# MKL computes a matmul of few rows through another kernel than a large one, so a
# short sequence alone would round differently than inside a pack. Padding every pack
# to a multiple of this many rows keeps each image's result independent of the pack.
ROW_BLOCK = 64


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def bidirectional_transformer_config(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    ffn_hidden_size: int,
    eps: float,
    tensor_parallel: int,
    params_dtype: torch.dtype,
    impl: str,
    fp8: str = "off",
    init_method_std: float = 0.02,
) -> TransformerConfig:
    """Pre-LayerNorm blocks with biases and tanh-GELU (SigLIP-style), no dropout."""
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_heads,
        kv_channels=hidden_size // num_heads,
        normalization="LayerNorm",
        layernorm_epsilon=eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        init_method_std=init_method_std,
        **common_config_kwargs(tensor_parallel, params_dtype, impl, fp8),
    )


def encoder_transformer_config(
    cfg: EncoderConfig, tensor_parallel: int, params_dtype: torch.dtype, impl: str, fp8: str = "off"
) -> TransformerConfig:
    return bidirectional_transformer_config(
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_attention_heads,
        cfg.ffn_hidden_size,
        cfg.layernorm_epsilon,
        tensor_parallel,
        params_dtype,
        impl,
        fp8,
        cfg.init_method_std,
    )


def padded_rows(rows: int) -> int:
    return -(-rows // ROW_BLOCK) * ROW_BLOCK


def packed_params(
    cu_seqlens: list[int], device: torch.device, rotary_angles: torch.Tensor | None = None
) -> PackedRotaryParams:
    """Packed-sequence parameters for a pack padded to whole row blocks: the padding rows form
    one extra sequence, so every attention backend sees sequences that cover the pack exactly.
    `rotary_angles` (per real row) are zero-padded likewise."""
    rows = cu_seqlens[-1]
    padded = padded_rows(rows)
    bounds = cu_seqlens + ([padded] if padded > rows else [])
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if rotary_angles is not None:
        rotary_angles = F.pad(rotary_angles.to(device), (0, 0, 0, padded - rows))
    return PackedRotaryParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        rotary_angles=rotary_angles,
        bounds=bounds,
    )


def row_blocked(fn, x: torch.Tensor) -> torch.Tensor:
    """fn over the rows of x, padded to a multiple of ROW_BLOCK rows (see ROW_BLOCK)."""
    rows = x.shape[0]
    return fn(F.pad(x, (0, 0, 0, padded_rows(rows) - rows)))[:rows]


class NativeResolutionViT(MegatronModule):
    def __init__(self, cfg: EncoderConfig, config: TransformerConfig, impl: str):
        super().__init__(config=config)
        self.patch_size = cfg.patch_size
        self.position_grid = cfg.position_embedding_size
        # Small, replicated on every tensor-parallel rank (same seed, same all-reduced grads).
        self.patch_embedding = torch.nn.Linear(3 * cfg.patch_size**2, cfg.hidden_size, dtype=config.params_dtype)
        self.position_embedding = torch.nn.Parameter(
            torch.randn(self.position_grid**2, cfg.hidden_size, dtype=config.params_dtype) * 0.02
        )
        self.transformer = transformer_block(config, impl)

    def position_embeddings(self, grids: torch.Tensor) -> torch.Tensor:
        """The learned square grid bilinearly resized (antialiased) to each image's (h, w) grid."""
        side = self.position_grid
        table = self.position_embedding.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        out = []
        for grid_h, grid_w in grids.tolist():
            resized = F.interpolate(table, size=(grid_h, grid_w), mode="bilinear", align_corners=False, antialias=True)
            out.append(resized[0].permute(1, 2, 0).reshape(grid_h * grid_w, -1))
        return torch.cat(out).to(self.position_embedding.dtype)

    def forward(self, images: PackedImages) -> torch.Tensor:
        """PackedImages -> [total_patches, hidden], one token per patch, images in pack order."""
        tokens = images.num_tokens
        rows = (0, 0, 0, padded_rows(tokens) - tokens)
        weight = self.patch_embedding.weight
        patches = F.pad(images.patches.to(device=weight.device, dtype=weight.dtype, non_blocking=True), rows)
        hidden = self.patch_embedding(patches) + F.pad(self.position_embeddings(images.grids), rows)
        packed = packed_params(images.cu_seqlens.tolist(), hidden.device)
        out = self.transformer(hidden_states=hidden.unsqueeze(1), attention_mask=None, packed_seq_params=packed)
        return out.squeeze(1)[:tokens]
