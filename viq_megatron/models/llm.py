"""The LLM: a Megatron-Core GPTModel shaped like a Llama / Qwen2 checkpoint.

RMSNorm, SwiGLU, grouped-query attention, RoPE with the checkpoint's base (a GPTModel
argument: the default 10000 would be silently wrong for e.g. SmolLM2's 100000),
Qwen2's QKV bias, tied or untied embeddings. Tensor and pipeline parallel like any
GPTModel: with pipeline parallelism each rank builds its stage's layers (one chunk per
virtual stage for the interleaved schedule); the first holds the embedding, the last the
output layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from viq_megatron.config import ConfigError, LLMArch
from viq_megatron.models.attention import PackedRotaryParams
from viq_megatron.models.specs import common_config_kwargs, transformer_layer_spec


def packed_rows(llm: GPTModel, bounds: list[int], position_ids: torch.Tensor) -> PackedRotaryParams:
    """Packed-sequence parameters for a row of samples with host `bounds` (cu_seqlens) and
    `position_ids` [T] restarting per sample: each token's RoPE angles, which the local layers
    apply in one pass over the row (TE layers use Megatron-Core's RoPE). Nothing is read back
    from the device."""
    inv_freq = llm.rotary_pos_emb.inv_freq
    device = inv_freq.device
    cu = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    angles = position_ids.to(device, non_blocking=True)[:, None].float() * inv_freq[None]
    return PackedRotaryParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        rotary_angles=angles,
        bounds=bounds,
    )


def llm_transformer_config(
    arch: LLMArch,
    tensor_parallel: int,
    params_dtype: torch.dtype,
    impl: str,
    fp8: str = "off",
    pipeline: tuple[int, int] = (1, 1),
    fused: bool = False,
) -> TransformerConfig:
    """`pipeline`: (pipeline-parallel size, virtual stages per rank). `fused`: Megatron-Core's
    native fused cross-entropy and SwiGLU (same results to float rounding)."""
    if arch.num_query_groups % tensor_parallel or arch.vocab_size % tensor_parallel:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size: {tensor_parallel} must divide the LLM's "
            f"num_query_groups={arch.num_query_groups} and vocab_size={arch.vocab_size}"
        )
    stages, virtual = pipeline
    if arch.num_layers % (stages * virtual):
        raise ConfigError(
            f"parallel: pipeline_model_parallel_size x virtual_pipeline_model_parallel_size = {stages} x {virtual} "
            f"must divide the LLM's {arch.num_layers} layers"
        )
    pipelined = (
        dict(
            pipeline_model_parallel_size=stages,
            virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None,
            # Packed rows vary in length: stages exchange shapes first. (Megatron-Core refuses
            # that with its default MoE dispatcher, even without experts.)
            variable_seq_lengths=True,
            moe_token_dispatcher_type="alltoall",
        )
        if stages > 1
        else {}
    )
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
        init_method_std=arch.init_method_std,
        **{
            **common_config_kwargs(tensor_parallel, params_dtype, impl, fp8),
            **(
                dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native", bias_activation_fusion=True)
                if fused
                else {}
            ),
        },
        **pipelined,
    )


def build_llm(
    arch: LLMArch, tensor_parallel: int, params_dtype: torch.dtype, impl: str, fp8: str = "off", fused: bool = False
) -> GPTModel:
    """The whole LLM on this rank (no pipeline parallelism)."""
    return build_llm_chunks(arch, tensor_parallel, params_dtype, impl, fp8, fused=fused)[0]


def build_llm_chunks(
    arch: LLMArch,
    tensor_parallel: int,
    params_dtype: torch.dtype,
    impl: str,
    fp8: str = "off",
    pipeline: tuple[int, int] = (1, 1),
    fused: bool = False,
) -> list[GPTModel]:
    """This rank's pipeline chunks, in virtual-stage order (one chunk without interleaving)."""
    config = llm_transformer_config(arch, tensor_parallel, params_dtype, impl, fp8, pipeline, fused)
    stages, virtual = pipeline
    if stages == 1:
        return [_gpt_model(config, arch, impl, True, True, None)]
    return [
        _gpt_model(
            config,
            arch,
            impl,
            parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
            parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v),
            v if virtual > 1 else None,
        )
        for v in range(virtual)
    ]


def _gpt_model(
    config: TransformerConfig, arch: LLMArch, impl: str, pre_process: bool, post_process: bool, vp_stage: int | None
) -> GPTModel:
    model = GPTModel(
        config=config,
        transformer_layer_spec=transformer_layer_spec(impl, causal=True),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_sequence_length,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        parallel_output=True,  # full logits on request via runtime_gather_output
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )
    # Torch norms (local spec) are created on the CPU even where megatron's layers are not.
    model = model.to(config.params_dtype)
    return model.cuda() if torch.cuda.is_available() else model
