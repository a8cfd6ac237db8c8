"""The LLM: a Megatron-Core GPTModel shaped like a Llama / Qwen2 checkpoint.

RMSNorm, SwiGLU, grouped-query attention, RoPE with the checkpoint's base (a GPTModel
argument: the default 10000 would be silently wrong for e.g. SmolLM2's 100000),
Qwen2's QKV bias, tied or untied embeddings. Tensor parallel like any GPTModel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from viq_megatron.config import ConfigError, LLMArch
from viq_megatron.models.specs import common_config_kwargs, transformer_layer_spec


def llm_transformer_config(arch: LLMArch, tensor_parallel: int, params_dtype: torch.dtype,
                           impl: str, fp8: str = "off") -> TransformerConfig:
    if arch.num_query_groups % tensor_parallel or arch.vocab_size % tensor_parallel:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size: {tensor_parallel} must divide the LLM's "
            f"num_query_groups={arch.num_query_groups} and vocab_size={arch.vocab_size}")
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.hidden_size // arch.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        rotary_interleaved=False,  # HF's rotate_half layout
        **common_config_kwargs(tensor_parallel, params_dtype, impl, fp8),
    )


def build_llm(arch: LLMArch, tensor_parallel: int, params_dtype: torch.dtype, impl: str,
              fp8: str = "off") -> GPTModel:
    config = llm_transformer_config(arch, tensor_parallel, params_dtype, impl, fp8)
    model = GPTModel(
        config=config,
        transformer_layer_spec=transformer_layer_spec(impl, causal=True),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_sequence_length,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        parallel_output=True,  # full logits on request via runtime_gather_output
    )
    # Torch norms (local spec) are created on the CPU even where megatron's layers are not.
    model = model.to(params_dtype)
    return model.cuda() if torch.cuda.is_available() else model
