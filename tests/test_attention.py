"""Packed core attention: the per-sequence path against a dense masked reference (CPU), the fused
variable-length path against the per-sequence path and alone against packed (CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from viq_megatron.models import attention
from viq_megatron.models.attention import PackedRotaryParams, PackedSDPAttention, apply_rotary

LENGTHS = [5, 17, 9, 1]


def core(megatron_world, heads: int, groups: int, causal: bool) -> PackedSDPAttention:
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=heads * 16, num_attention_heads=heads, num_query_groups=groups, attention_dropout=0.0
    )
    return PackedSDPAttention(
        config,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal if causal else AttnMaskType.no_mask,
        attention_type="self",
    )


def packed(lengths, device, angles=None) -> PackedRotaryParams:
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    return PackedRotaryParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
        rotary_angles=angles,
        bounds=bounds,
    )


def qkv(heads, groups, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    return [torch.randn(total, n, 16, generator=g).to(device, dtype) for n in (heads, groups, groups)]


@pytest.mark.parametrize("causal", [False, True])
def test_per_sequence_path_equals_a_dense_block_diagonal_reference(megatron_world, causal):
    """RoPE angles applied, grouped-query heads: one SDPA call over the whole pack with a
    block-diagonal (and causal) mask, written out densely, gives the same outputs."""
    heads, groups = 4, 2
    q, k, v = qkv(heads, groups, "cpu", torch.float32)
    angles = torch.randn(sum(LENGTHS), 8, generator=torch.Generator().manual_seed(1))
    out = core(megatron_world, heads, groups, causal)(q, k, v, None, packed_seq_params=packed(LENGTHS, "cpu", angles))
    q, k = apply_rotary(q, angles), apply_rotary(k, angles)
    sample = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    allowed = sample[:, None] == sample[None, :]
    if causal:
        allowed &= torch.ones_like(allowed).tril()
    k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed)
    assert torch.allclose(out, dense.transpose(0, 1).reshape(out.shape), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or attention.varlen_attn is None, reason="needs CUDA and varlen_attn")
@pytest.mark.parametrize("causal", [False, True])
def test_fused_varlen_path_equals_per_sequence_path_and_ignores_the_pack(megatron_world, monkeypatch, causal):
    """bf16 on CUDA: the one-call varlen path vs the per-sequence SDPA path (bf16 tolerance), and
    each sequence's output bit for bit the same alone as inside the pack (num_splits=1)."""
    heads, groups = 4, 2
    module = core(megatron_world, heads, groups, causal).cuda()
    q, k, v = qkv(heads, groups, "cuda", torch.bfloat16)
    fused = module(q, k, v, None, packed_seq_params=packed(LENGTHS, "cuda"))
    first = LENGTHS[0]
    alone = module(q[:first], k[:first], v[:first], None, packed_seq_params=packed(LENGTHS[:1], "cuda"))
    assert torch.equal(fused[:first], alone)
    monkeypatch.setattr(attention, "varlen_attn", None)
    looped = module(q, k, v, None, packed_seq_params=packed(LENGTHS, "cuda"))
    assert torch.allclose(fused.float(), looped.float(), atol=2e-2, rtol=2e-2)
