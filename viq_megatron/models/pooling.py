"""SigLIP's attention-pooling ("MAP") head: one vector per image from its tokens.

A learned probe attends over the image's tokens, then LayerNorm and an MLP with a
residual. Kept from an imported SigLIP/SigLIP2 checkpoint, frozen, to pool the features
stage 1 distils (the pooled vector SigLIP was trained to align with text). The parameter
names are Hugging Face's (`nn.MultiheadAttention`), so imported weights load as they are.
"""

from __future__ import annotations

import torch

from viq_megatron.models.viq_head import MLP


class AttentionPooling(torch.nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.probe = torch.nn.Parameter(torch.zeros(1, 1, hidden, dtype=dtype))
        self.attention = torch.nn.MultiheadAttention(hidden, heads, batch_first=True, dtype=dtype)
        self.layernorm = torch.nn.LayerNorm(hidden, eps=eps, dtype=dtype)
        self.mlp = MLP(hidden, ffn, hidden, dtype)  # fc1, fc2: Hugging Face's names

    def forward(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Packed tokens [T, hidden] of images bounded by cu_seqlens -> [images, hidden]."""
        bounds = cu_seqlens.tolist()
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            image = tokens[a:b][None].to(self.probe.dtype)
            pooled = self.attention(self.probe, image, image, need_weights=False)[0]
            out.append((pooled + self.mlp(self.layernorm(pooled)))[0, 0])
        return torch.stack(out)
