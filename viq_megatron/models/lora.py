"""LoRA adapters on a Megatron-Core model's linears: y = W x + (alpha / r) * B (A x).

The adapters live on the existing linear modules (`<linear>.lora_a`, `<linear>.lora_b`)
and act through a forward hook, so the base weights keep their names and a pretrained
checkpoint loads unchanged. B starts at zero: the adapted model begins exactly at the
pretrained one. Tensor parallelism is refused by the config for now (the adapters
would need the same partitioning as their base weights).

Transformer Engine fuses the layer norm into `linear_qkv` and `linear_fc1` (its
LayerNormLinear): a hook there sees the un-normalised input, so `W + s·BA` merged at export
would be another model. Those targets are refused under TE layers; `linear_proj` and
`linear_fc2` (plain linears in both specs) take adapters everywhere.
"""

from __future__ import annotations

import math

import torch

from viq_megatron.config import ConfigError, LoRAConfig

ADAPTER_MARK = ".lora_"


def add_lora(model: torch.nn.Module, cfg: LoRAConfig) -> int:
    """Adds adapters to every linear whose name ends with one of cfg.targets; returns how many."""
    count = 0
    for name, module in model.named_modules():
        if not any(name.endswith(target) for target in cfg.targets):
            continue
        if getattr(module, "layer_norm_weight", None) is not None:  # TE's LayerNormLinear
            raise ConfigError(
                f"model.llm.lora.targets: {name} fuses its layer norm under Transformer Engine, so an "
                "adapter there would not merge into its weight; target linear_proj/linear_fc2 only, or "
                "set model.transformer_impl: local"
            )
        weight = module.weight
        out_features, in_features = weight.shape
        module.lora_a = torch.nn.Parameter(torch.empty(cfg.rank, in_features, dtype=weight.dtype, device=weight.device))
        torch.nn.init.kaiming_uniform_(module.lora_a, a=math.sqrt(5))
        module.lora_b = torch.nn.Parameter(
            torch.zeros(out_features, cfg.rank, dtype=weight.dtype, device=weight.device)
        )
        scale = cfg.alpha / cfg.rank

        def adapt(module, args, output, scale=scale):
            delta = (args[0] @ module.lora_a.t()) @ module.lora_b.t() * scale
            return (output[0] + delta, *output[1:]) if isinstance(output, tuple) else output + delta

        module.register_forward_hook(adapt)
        count += 1
    if count == 0:
        raise ConfigError(f"model.llm.lora.targets: {cfg.targets} match no linear layer")
    return count


def is_adapter(name: str) -> bool:
    return ADAPTER_MARK in name
