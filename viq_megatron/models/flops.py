"""Counted model FLOPs and device peaks, for TFLOP/s and MFU lines.

Counts matmul FLOPs (2 per multiply-add) of the forward pass; a training step is
3x that (backward = 2x forward). Norms, activations and softmax are left out, as in
the usual MFU convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from viq_megatron.config import EncoderConfig, HeadConfig, LLMArch
from viq_megatron.models.quantizers import FSQ_PRESETS

# Dense bf16 tensor-core peaks (no sparsity), by a substring of the device name.
_PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is lower (756e12) and reports "H100 PCIe"
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def vit_forward_flops(cfg: EncoderConfig, seqlens: Sequence[int]) -> float:
    """Forward FLOPs of the encoder over images of `seqlens` patches each (attention per image)."""
    tokens = sum(seqlens)
    hidden, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    linears = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn)  # qkv + proj + fc1 + fc2
    attention = sum(4 * length * length * hidden for length in seqlens)  # QK^T and AV
    embedding = 2 * tokens * 3 * cfg.patch_size**2 * hidden
    return cfg.num_layers * (linears + attention) + embedding


def llm_forward_flops(arch: LLMArch, seqlens: Sequence[int]) -> float:
    """Forward FLOPs of the LLM over packed causal sequences of `seqlens` tokens (logits included)."""
    tokens = sum(seqlens)
    h, f = arch.hidden_size, arch.ffn_hidden_size
    kv = 2 * arch.num_query_groups * (h // arch.num_attention_heads)
    linears = 2 * tokens * (h * (h + kv) + h * h + 3 * h * f)  # qkv, proj, gate+up, down
    attention = sum(2 * length * length * h for length in seqlens)  # causal: half of QK^T and AV
    return arch.num_layers * (linears + attention) + 2 * tokens * h * arch.vocab_size


def code_embedding_forward_flops(head: HeadConfig, encoder: EncoderConfig, llm_hidden: int, patches: int) -> float:
    """Forward FLOPs of the discrete path's visual input over `patches` patches: the ViQ head's
    per-patch decoding of its 4 codes (from_code, merge, post blocks) and the projector."""
    c, s = encoder.hidden_size, head.subtoken_size
    decoding = 4 * len(FSQ_PRESETS[head.codebook]) * s + 4 * s * c + c * c + head.post_blocks * 8 * c * c
    projector = c * llm_hidden + llm_hidden * llm_hidden
    return 2 * patches * (decoding + projector)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in _PEAK_BF16_FLOPS if key in name]
    return _PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None
