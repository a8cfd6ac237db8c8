"""Layer specs: which class fills each slot of a Megatron-Core TransformerLayer.

Three implementations, chosen once per model:
- Transformer Engine (`TEDotProductAttention`, fused LayerNorm-linears): packed (thd)
  attention and FP8 on GPUs where TE is installed;
- local: Megatron-Core's parallel linears and torch norms, with `PackedSDPAttention`,
  which takes packed sequences on CPU and on GPUs without TE;
- standalone: the local layers with single-rank linears and no process group, so a module
  (the ViQ tokenizer used as a library) runs as plain torch with no distributed runtime.
  Megatron-Core's parallel linears need an initialised torch.distributed even at TP=1.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from viq_megatron import GPU_EXTRAS
from viq_megatron.config import ConfigError
from viq_megatron.models.attention import PackedRopeSelfAttention, PackedSDPAttention

log = logging.getLogger(__name__)
_said_local = False

# TE fuses each pre-norm into the linear after it. Checkpoints of local layers use TE's
# names (as Megatron-Core's own local spec does), so either kind of run loads the other's.
LOCAL_TO_TE = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def resolve_transformer_impl(requested: str) -> str:
    """'auto' -> 'transformer_engine' when TE imports, else 'local' (said once in the log)."""
    global _said_local
    if requested == "transformer_engine" and not GPU_EXTRAS["transformer_engine"]:
        raise ConfigError(
            "model.transformer_impl: transformer_engine requested, but Transformer Engine "
            "is not installed or not usable here (it needs CUDA); use 'auto' or 'local'"
        )
    if requested == "auto":
        requested = "transformer_engine" if GPU_EXTRAS["transformer_engine"] else "local"
        if requested == "local" and not _said_local:
            log.info("Transformer Engine not available: using Megatron-Core local layers")
            _said_local = True
    return requested


def common_config_kwargs(tensor_parallel: int, params_dtype: torch.dtype, impl: str, fp8: str = "off") -> dict:
    """TransformerConfig settings every model here shares: parallelism, precision (FP8 with TE
    layers only), the layer implementation, no dropout, and no fused kernels (they need TE or
    apex; TE fuses itself)."""
    if fp8 != "off" and impl != "transformer_engine":
        raise ConfigError(
            "model.fp8: FP8 needs Transformer Engine layers, and Transformer Engine is not "
            "installed or not usable here (or model.transformer_impl is local)"
        )
    precision = dict(fp8="hybrid", fp8_recipe="delayed" if fp8 == "delayed" else "tensorwise") if fp8 != "off" else {}
    return dict(
        **precision,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        transformer_impl="transformer_engine" if impl == "transformer_engine" else "local",
    )


STANDALONE = "standalone"


class SingleRankLinear(torch.nn.Module):
    """Megatron-Core's parallel-linear interface on one rank without a process group: the same
    parameters (weight [out, in], bias) and the same (output, bias-if-skipped) result, computed
    as its linear computes it (matmul, then the bias), so the outputs are bit-identical."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method,
        bias: bool = True,
        skip_bias_add: bool = False,
        **parallel_options,
    ):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype)) if bias else None
        if config.perform_initialization:
            init_method(self.weight)
        self.skip_bias_add = skip_bias_add

    def forward(self, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        output = torch.matmul(x, self.weight.t())
        if self.skip_bias_add or self.bias is None:
            return output, self.bias
        return output + self.bias, None


def transformer_block(
    config: TransformerConfig, impl: str, causal: bool = False, post_layer_norm: bool = True
) -> TransformerBlock:
    """A Megatron-Core TransformerBlock of `impl` layers; a standalone one holds no process group."""
    groups = ProcessGroupCollection(tp=None, cp=None, pp=None) if impl == STANDALONE else None
    return TransformerBlock(
        config, transformer_layer_spec(impl, causal), post_layer_norm=post_layer_norm, pg_collection=groups
    )


def transformer_layer_spec(impl: str, causal: bool) -> ModuleSpec:
    """A pre-norm transformer layer: bidirectional (ViT encoder, quantization head) or causal (LLM).

    The norm type (LayerNorm / RMSNorm) and the MLP's gating come from the TransformerConfig."""
    if impl == "transformer_engine":
        # optional: gpu (Transformer Engine's layer specs, imported only for a TE model)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec() if causal else get_vit_layer_with_transformer_engine_spec()
    column, row = (
        (SingleRankLinear, SingleRankLinear) if impl == STANDALONE else (ColumnParallelLinear, RowParallelLinear)
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=PackedRopeSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=PackedSDPAttention,
                    linear_proj=row,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=LOCAL_TO_TE,
        ),
    )


def _renamed(state: dict, renames: dict[str, str]) -> dict:
    out = {}
    for name, tensor in state.items():
        for old, new in renames.items():
            name = name.replace(f".{old}", f".{new}")
        out[name] = tensor
    return out


def te_layer_names(state: dict) -> dict:
    """A local-spec state dict renamed for the TE spec (see LOCAL_TO_TE)."""
    return _renamed(state, LOCAL_TO_TE)


def local_layer_names(state: dict) -> dict:
    """A TE-spec state dict renamed for the local spec (either kind of state dict passes)."""
    return _renamed(state, {te: local for local, te in LOCAL_TO_TE.items()})
