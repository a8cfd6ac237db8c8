"""Core attention over packed sequences, where Transformer Engine's packed (thd) attention
is unavailable: every CPU run, and GPUs without TE. Megatron's local `DotProductAttention`
rejects `PackedSeqParams` outright.

- On CUDA in half precision: one call of torch's fused variable-length attention
  (`varlen_attn`, FlashAttention over `cu_seqlens`, causal by window) for the whole pack,
  grouped-query attention included, with `num_splits=1` so that a sequence's output does not
  depend on what it was packed with.
- Elsewhere (CPU, fp32, dropout): one SDPA call per sequence of the pack, not one call with
  a block-diagonal mask: no work on masked-out blocks, and a sequence's output is bit for bit
  independent of its neighbours (what makes an image's codes independent of its pack).

RoPE from per-token angles (`PackedRotaryParams.rotary_angles`) is applied here, to the
whole pack at once: the 2D RoPE of the ViQ head and the pixel decoder, and the LLM's RoPE
(`PackedRopeSelfAttention` then skips Megatron-Core's, which loops over the samples with
host reads of `cu_seqlens`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide, get_pg_size

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10
    varlen_attn = None


@dataclass
class PackedRotaryParams(PackedSeqParams):
    """Packed-sequence parameters that also carry per-token rotary angles [tokens, head_dim / 2]
    (2D RoPE over an image's patch grid, or the LLM's positions restarting per sample), and the
    sequence bounds on the host (the per-sequence path then reads nothing from the device)."""

    rotary_angles: torch.Tensor | None = None
    bounds: list[int] | None = None


class PackedRopeSelfAttention(SelfAttention):
    """Megatron-Core's SelfAttention; when the packed parameters carry per-token angles, RoPE is
    left to the core attention (one pass over the pack) instead of Megatron-Core's own."""

    def forward(self, hidden_states, attention_mask=None, *args, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        if getattr(packed_seq_params, "rotary_angles", None) is not None:
            rotary_pos_emb = None
        return super().forward(
            hidden_states,
            attention_mask,
            *args,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params,
            **kwargs,
        )


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [tokens, heads, d], angles [tokens, d / 2]."""
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class PackedSDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("PackedSDPAttention does not support context parallelism; use Transformer Engine")
        tp_size = (
            parallel_state.get_tensor_model_parallel_world_size()
            if pg_collection is None
            else get_pg_size(pg_collection.tp)
        )  # 1 for a module built without process groups
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_query_groups = divide(config.num_query_groups or config.num_attention_heads, tp_size)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [..., heads, L, d], k/v [..., groups, L, d] -> [..., heads, L, d]."""
        if self.num_query_groups != self.num_heads:
            repeat = self.num_heads // self.num_query_groups
            k = k.repeat_interleave(repeat, dim=-3)
            v = v.repeat_interleave(repeat, dim=-3)
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0:
            # Heads are split over tensor-parallel ranks: each rank needs its own dropout stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=mask,
                    dropout_p=dropout_p,
                    is_causal=causal and mask is None,
                    scale=self.softmax_scale,
                )
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=self.softmax_scale
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("PackedSDPAttention does not take an attention bias")
        causal = (attn_mask_type or self.attn_mask_type) in _CAUSAL
        angles = getattr(packed_seq_params, "rotary_angles", None)
        if angles is not None:
            query, key = apply_rotary(query, angles), apply_rotary(key, angles)
        if packed_seq_params is not None:
            # thd: query [tokens, heads, d].
            dropout = self.dropout_p if self.training else 0.0
            if (
                varlen_attn is not None
                and query.is_cuda
                and query.dtype in (torch.float16, torch.bfloat16)
                and dropout == 0
            ):
                cu = packed_seq_params.cu_seqlens_q.to(torch.int32)
                longest = packed_seq_params.max_seqlen_q
                out = varlen_attn(
                    query,
                    key,
                    value,
                    cu,
                    cu,
                    longest,
                    longest,
                    scale=self.softmax_scale,
                    window_size=(-1, 0) if causal else (-1, -1),
                    enable_gqa=self.num_query_groups != self.num_heads,
                    num_splits=1,
                )
                return out.reshape(query.shape[0], -1)
            # One SDPA call per sequence, on [1, heads, L, d] views of the token-major memory: no
            # copies, and the layout torch's CPU flash kernel reads fastest (2-3x faster than
            # 3-D head-major inputs).
            bounds = getattr(packed_seq_params, "bounds", None) or packed_seq_params.cu_seqlens_q.tolist()
            outputs = [
                self._attend(*(t[a:b].unsqueeze(0).transpose(1, 2) for t in (query, key, value)), causal)[0].transpose(
                    0, 1
                )
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
            return torch.cat(outputs).reshape(query.shape[0], -1)
        # sbhd: [seq, batch, heads, d]; Megatron's mask is True where attention is *not* allowed.
        mask = None if attention_mask is None else ~attention_mask
        out = self._attend(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), causal, mask)
        seq, batch = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
