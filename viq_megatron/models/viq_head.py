"""The ViQ quantization head: encoder tokens -> discrete codes -> LLM-ready features.

    encoder tokens [N, C]
      -> LayerNorm (no affine) -> pre blocks (TransformerBlock at width C)
      -> expand: Linear C -> 4s, i.e. each 16x16 patch becomes 2x2 sub-tokens of width s
      -> head-wise blocks over the patch grid: a patch is one token of width 4s whose
         4 attention heads are its 4 sub-tokens, with 2D RoPE on (row, column)
      -> per sub-token: Linear s -> d, quantizer (d = len(levels)), Linear d -> s
      -> merge the 4 sub-tokens: MLP 4s -> C
      -> residual MLP blocks (per token) -> learned affine            [N, C]

Everything after the quantizer acts per patch, so a patch's output is a function of its
4 codes alone: `embed_codes` computes it from indices, with no image and no encoder.
One code per 8x8 pixels, four per 16x16 patch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from viq_megatron.config import EncoderConfig, HeadConfig
from viq_megatron.data.packing import PackedImages
from viq_megatron.models.attention import PackedRotaryParams
from viq_megatron.models.quantizers import FSQ_PRESETS, Quantizer
from viq_megatron.models.specs import STANDALONE, transformer_block
from viq_megatron.models.vit import bidirectional_transformer_config, packed_params, row_blocked

log = logging.getLogger(__name__)
SUBTOKENS = 4  # 2x2 per patch


class MLP(torch.nn.Module):
    """Linear, tanh-GELU, Linear. The names `fc1`, `fc2` are Hugging Face's: SigLIP's pooling head
    (models/pooling.py) is this module too, so its imported weights load as they are."""

    def __init__(self, in_size: int, hidden: int, out_size: int, dtype: torch.dtype):
        super().__init__()
        self.fc1 = torch.nn.Linear(in_size, hidden, dtype=dtype)
        self.fc2 = torch.nn.Linear(hidden, out_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ResidualMLP(torch.nn.Module):
    def __init__(self, size: int, dtype: torch.dtype):
        super().__init__()
        self.norm = torch.nn.LayerNorm(size, dtype=dtype)
        self.mlp = MLP(size, 4 * size, size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def grid_rope_angles(grids: list[tuple[int, int]], head_dim: int, base: float) -> torch.Tensor:
    """2D RoPE angles [patches, head_dim / 2] of images with (rows, columns) `grids`, on the host:
    half the frequencies encode the row, half the column."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = [], []
    for grid_h, grid_w in grids:
        r, c = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
        rows.append(r.reshape(-1))
        cols.append(c.reshape(-1))
    rows, cols = torch.cat(rows).float(), torch.cat(cols).float()
    return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], -1)


class ViQHead(MegatronModule):
    def __init__(
        self,
        cfg: HeadConfig,
        encoder: EncoderConfig,
        tensor_parallel: int,
        params_dtype: torch.dtype,
        impl: str,
        fp8: str = "off",
    ):
        # FP8 (with TE) reaches the pre-quantization blocks only; the quantizer runs in fp32.
        pre_config = bidirectional_transformer_config(
            encoder.hidden_size,
            max(cfg.pre_layers, 1),
            encoder.num_attention_heads,
            encoder.ffn_hidden_size,
            encoder.layernorm_epsilon,
            tensor_parallel,
            params_dtype,
            impl,
            fp8,
        )
        super().__init__(config=pre_config)
        width, s = encoder.hidden_size, cfg.subtoken_size
        self.cfg = cfg
        self.input_norm = torch.nn.LayerNorm(width, elementwise_affine=False, dtype=params_dtype)
        self.pre = transformer_block(pre_config, impl, post_layer_norm=False) if cfg.pre_layers else None
        self.expand = torch.nn.Linear(width, SUBTOKENS * s, dtype=params_dtype)
        self.expand_mlp = MLP(s, s, s, params_dtype)
        # 2D RoPE lives in our packed attention, so these blocks always take the local spec.
        subtoken_impl = STANDALONE if impl == STANDALONE else "local"
        if impl == "transformer_engine":
            log.info(
                "ViQ head: pre-blocks on Transformer Engine layers%s; sub-token blocks on local layers "
                "(their 2D RoPE is applied in our core attention)",
                f" (FP8 {fp8})" if fp8 != "off" else "",
            )
        subtoken_config = bidirectional_transformer_config(
            SUBTOKENS * s,
            cfg.subtoken_layers,
            SUBTOKENS,
            cfg.subtoken_ffn_size,
            encoder.layernorm_epsilon,
            tensor_parallel,
            params_dtype,
            subtoken_impl,
        )
        self.subtoken_blocks = transformer_block(subtoken_config, subtoken_impl)
        self.quantizer = Quantizer(cfg.quantizer, FSQ_PRESETS[cfg.codebook])
        self.to_code = torch.nn.Linear(s, self.quantizer.dim, dtype=params_dtype)
        self.from_code = torch.nn.Linear(self.quantizer.dim, s, dtype=params_dtype)
        self.merge = MLP(SUBTOKENS * s, width, width, params_dtype)
        self.post = torch.nn.Sequential(*[ResidualMLP(width, params_dtype) for _ in range(cfg.post_blocks)])
        self.affine_scale = torch.nn.Parameter(torch.ones(width, dtype=params_dtype))
        self.affine_shift = torch.nn.Parameter(torch.zeros(width, dtype=params_dtype))

    def _packed(self, images: PackedImages, rope: bool) -> PackedRotaryParams:
        angles = grid_rope_angles(images.grids.tolist(), self.cfg.subtoken_size, self.cfg.rope_base) if rope else None
        return packed_params(images.cu_seqlens.tolist(), self.expand.weight.device, angles)

    def _blocks(self, block: TransformerBlock, x: torch.Tensor, packed: PackedRotaryParams) -> torch.Tensor:
        return row_blocked(
            lambda h: block(hidden_states=h.unsqueeze(1), attention_mask=None, packed_seq_params=packed).squeeze(1), x
        )

    def pre_quantization(self, tokens: torch.Tensor, images: PackedImages) -> torch.Tensor:
        """Encoder tokens [N, C] -> bottleneck vectors [N, 4, d] (before the quantizer)."""
        n, s = tokens.shape[0], self.cfg.subtoken_size
        x = row_blocked(self.input_norm, tokens)
        if self.pre is not None:
            x = self._blocks(self.pre, x, self._packed(images, rope=False))
        sub = row_blocked(self.expand, x).reshape(n * SUBTOKENS, s)
        sub = sub + row_blocked(self.expand_mlp, sub)
        x = self._blocks(self.subtoken_blocks, sub.reshape(n, SUBTOKENS * s), self._packed(images, rope=self.cfg.rope))
        return row_blocked(self.to_code, x.reshape(n * SUBTOKENS, s)).reshape(n, SUBTOKENS, -1)

    def post_quantization(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized vectors [N, 4, d] -> features [N, C], each patch from its own 4 codes."""
        n = quantized.shape[0]
        weight = self.from_code.weight
        sub = row_blocked(self.from_code, quantized.reshape(n * SUBTOKENS, -1).to(weight.dtype))
        x = row_blocked(self.merge, sub.reshape(n, -1))
        x = row_blocked(self.post, x)
        return x * self.affine_scale + self.affine_shift

    def forward(self, tokens: torch.Tensor, images: PackedImages) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, C], bottleneck vectors before quantization [N, 4, d])."""
        z = self.pre_quantization(tokens, images)
        return self.post_quantization(self.quantizer(z)), z

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """FSQ indices [N, 4] of bottleneck vectors."""
        return self.quantizer.fsq.codes_to_indices(self.quantizer.fsq(z))

    def embed_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [N, 4] -> the features the online head gives for them [N, C]."""
        return self.post_quantization(self.quantizer.fsq.indices_to_codes(indices))
