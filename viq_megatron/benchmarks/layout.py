"""Parallel layouts from counted FLOPs, parameters and bytes (viq_megatron/cli/plan_layout.py
prints them; its docstring gives the model of a step). The parameter counts are the built
models' exactly (tests/test_plan_layout.py), so the memory estimate starts from real numbers."""

from __future__ import annotations

from dataclasses import dataclass

from viq_megatron.config import EncoderConfig, LLMArch
from viq_megatron.models.flops import llm_forward_flops, vit_forward_flops

LLMS = {  # from the checkpoints' config.json
    "qwen2.5-0.5b": LLMArch(896, 24, 14, 2, 4864, 151936, qkv_bias=True, model_type="qwen2"),
    "qwen2.5-1.5b": LLMArch(1536, 28, 12, 2, 8960, 151936, qkv_bias=True, model_type="qwen2"),
    "qwen2.5-3b": LLMArch(2048, 36, 16, 2, 11008, 151936, qkv_bias=True, model_type="qwen2"),
    "qwen2.5-7b": LLMArch(3584, 28, 28, 4, 18944, 152064, qkv_bias=True, tie_word_embeddings=False, model_type="qwen2"),
}
ENCODERS = {  # SigLIP2 vision towers, patch 16
    "so400m": EncoderConfig(16, 1152, 27, 16, 4304),
    "giant-1b": EncoderConfig(16, 1536, 40, 16, 6144),
}
BF16, FP32 = 2, 4


def llm_parameters(arch: LLMArch) -> int:
    h, f, head_dim = arch.hidden_size, arch.ffn_hidden_size, arch.hidden_size // arch.num_attention_heads
    kv = 2 * arch.num_query_groups * head_dim
    per_layer = h * (h + kv) + h * h + 3 * h * f + 2 * h + ((h + kv) if arch.qkv_bias else 0)
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return arch.num_layers * per_layer + embeddings + h


def encoder_parameters(cfg: EncoderConfig) -> int:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # linears with biases, two LayerNorms
    embeddings = 3 * cfg.patch_size**2 * h + h + cfg.position_embedding_size**2 * h
    return cfg.num_layers * per_layer + embeddings + 2 * h


def activation_bytes_per_token_layer(hidden: int, ffn: int, kv: int, tensor_parallel: int, gated: bool) -> float:
    """bf16 tensors a layer keeps for its backward pass, per token: the two norms' inputs and
    outputs (replicated over TP), QKV, attention output, the MLP's input and hidden (split)."""
    split = hidden + kv + hidden + (3 if gated else 2) * ffn
    return BF16 * (4 * hidden + split / tensor_parallel)


@dataclass
class Plan:
    tp: int
    pp: int
    dp: int
    memory_gib: float
    step_s: float
    tokens_per_s_per_gpu: float


def plan(
    llm: LLMArch,
    encoder: EncoderConfig | None,
    encoder_trained: bool,
    seq: int,
    gpus: int,
    micro_batches: int,
    visual_fraction: float,
    image_patches: int,
    args,
) -> Plan | None:
    """The fastest layout that fits, or None. `args`: the machine (plan_layout's options
    peak_tflops, mfu, gpus_per_node, nvlink_gbs, network_gbs, memory_gib, overhead_gib)."""
    peak = args.peak_tflops * 1e12 * args.mfu
    best = None
    kv = 2 * llm.num_query_groups * (llm.hidden_size // llm.num_attention_heads)
    images = max(1, round(seq * visual_fraction / image_patches)) if encoder else 0
    for tp in (t for t in (1, 2, 4, 8) if t <= min(gpus, args.gpus_per_node) and llm.num_query_groups % t == 0):
        for pp in (p for p in range(1, llm.num_layers + 1) if llm.num_layers % p == 0 and gpus % (tp * p) == 0):
            dp = gpus // (tp * pp)
            m = max(micro_batches, pp)
            # compute per packed row
            llm_row = 3 * llm_forward_flops(llm, [seq]) / (tp * pp) / peak
            enc_row = 0.0
            if encoder:
                enc_flops = vit_forward_flops(encoder, [image_patches] * images)
                enc_row = (3 if encoder_trained else 1) * enc_flops / tp / peak
            tp_comm = (
                0.0
                if tp == 1
                else (
                    4 * 2 * (tp - 1) / tp * seq * llm.hidden_size * BF16 * llm.num_layers / pp / (args.nvlink_gbs * 1e9)
                )
            )
            stage = llm_row + tp_comm + enc_row  # the first stage carries the encoder
            step = (m + pp - 1) * stage
            trained_llm = llm_parameters(llm) / (tp * pp)
            dp_comm = 2 * trained_llm * BF16 * (dp - 1) / dp / (args.network_gbs * 1e9) if dp > 1 else 0.0
            step += max(0.0, dp_comm - m * stage * 2 / 3)  # overlapped with the backward passes
            # memory on the first stage (+ its encoder); the last stage's logits if larger
            state = trained_llm * (BF16 + FP32 + 3 * FP32 / dp)
            act = (
                llm.num_layers
                / pp
                * pp
                * seq
                * activation_bytes_per_token_layer(llm.hidden_size, llm.ffn_hidden_size, kv, tp, gated=True)
            )
            enc_bytes = 0.0
            if encoder:
                enc_params = encoder_parameters(encoder) / tp
                enc_bytes = enc_params * (BF16 + FP32 + 3 * FP32 / dp) if encoder_trained else enc_params * BF16
                if encoder_trained:
                    enc_bytes += (
                        pp
                        * images
                        * image_patches
                        * encoder.num_layers
                        * activation_bytes_per_token_layer(
                            encoder.hidden_size, encoder.ffn_hidden_size, 2 * encoder.hidden_size, tp, gated=False
                        )
                    )
            logits = seq * llm.vocab_size / tp * (BF16 + 2 * FP32)
            first = state + act + enc_bytes + (logits if pp == 1 else 0.0)
            last = (
                state
                + llm.num_layers
                / pp
                * seq
                * activation_bytes_per_token_layer(llm.hidden_size, llm.ffn_hidden_size, kv, tp, gated=True)
                + logits
            )
            memory = max(first, last) / 2**30 + args.overhead_gib
            if memory > args.memory_gib:
                continue
            candidate = Plan(tp, pp, dp, memory, step, seq * m * dp / step / gpus)
            if best is None or candidate.tokens_per_s_per_gpu > best.tokens_per_s_per_gpu:
                best = candidate
    return best
