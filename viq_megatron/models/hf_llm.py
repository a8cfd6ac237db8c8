"""Hugging Face Llama / Qwen2 checkpoints <-> our Megatron-Core GPTModel layout.

Our converted checkpoint is a directory:
    llm_arch.json        the LLMArch (sizes, RoPE base, bias, tied embeddings, model type)
    model.safetensors    all weights in Megatron's TP=1 layout
    tp{N}/rank{r}.safetensors   optional shards for tensor parallelism N
    tokenizer/           the checkpoint's Hugging Face tokenizer (with its chat template)

Layout facts the mapping rests on: Megatron fuses q, k, v into `linear_qkv` grouped per
query group ([the group's q heads, its k head, its v head]); it fuses SwiGLU's gate
and up projections into `linear_fc1` as [gate; up]; HF's rotate_half RoPE is
Megatron's non-interleaved RoPE.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from viq_megatron.config import LLMArch
from viq_megatron.models.files import WEIGHTS_FILE
from viq_megatron.models.sharding import load_full_state_dict, split_tensor
from viq_megatron.models.specs import te_layer_names
from viq_megatron.runtime.errors import InputError

ARCH_FILE = "llm_arch.json"


class CheckpointError(InputError):
    """A checkpoint that cannot be used; one line naming the file and the tensor."""


def arch_from_hf_config(hf: dict) -> LLMArch:
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2"):
        raise CheckpointError(f"config.json: model_type {model_type!r} is not llama or qwen2")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise CheckpointError("config.json: head_dim * num_attention_heads != hidden_size is not supported")
    if hf.get("rope_scaling"):
        raise CheckpointError("config.json: rope_scaling is not supported yet")
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return LLMArch(
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        rotary_base=float(rope),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_sequence_length=hf.get("max_position_embeddings", 4096),
        model_type=model_type,
    )


def hf_config_dict(arch: LLMArch) -> dict:
    return {
        "model_type": arch.model_type,
        "architectures": ["LlamaForCausalLM" if arch.model_type == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "intermediate_size": arch.ffn_hidden_size,
        "vocab_size": arch.vocab_size,
        "rope_theta": arch.rotary_base,
        "rms_norm_eps": arch.norm_epsilon,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "max_position_embeddings": arch.max_sequence_length,
        "hidden_act": "silu",
        **({"attention_bias": arch.qkv_bias} if arch.model_type == "llama" else {}),
    }


def _expect(state: dict, name: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
    if name not in state:
        raise CheckpointError(f"{source}: tensor {name} is missing")
    tensor = state[name]
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def hf_to_megatron(hf: dict[str, torch.Tensor], arch: LLMArch, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    h, heads, groups = arch.hidden_size, arch.num_attention_heads, arch.num_query_groups
    d = h // heads
    per_group = heads // groups

    used = set()

    def get(name, shape):
        used.add(name)
        return _expect(hf, name, shape, source)

    out = {
        "embedding.word_embeddings.weight": get("model.embed_tokens.weight", (arch.vocab_size, h)),
        "decoder.final_layernorm.weight": get("model.norm.weight", (h,)),
    }
    if not arch.tie_word_embeddings:
        out["output_layer.weight"] = get("lm_head.weight", (arch.vocab_size, h))
    for i in range(arch.num_layers):
        hf_l, mg_l = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf_l + "self_attn."
        q = get(attn + "q_proj.weight", (heads * d, h)).reshape(groups, per_group * d, h)
        k = get(attn + "k_proj.weight", (groups * d, h)).reshape(groups, d, h)
        v = get(attn + "v_proj.weight", (groups * d, h)).reshape(groups, d, h)
        out[mg_l + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, h)
        if arch.qkv_bias:
            qb = get(attn + "q_proj.bias", (heads * d,)).reshape(groups, per_group * d)
            kb = get(attn + "k_proj.bias", (groups * d,)).reshape(groups, d)
            vb = get(attn + "v_proj.bias", (groups * d,)).reshape(groups, d)
            out[mg_l + "self_attention.linear_qkv.bias"] = torch.cat([qb, kb, vb], 1).reshape(-1)
        out[mg_l + "self_attention.linear_proj.weight"] = get(attn + "o_proj.weight", (h, heads * d))
        out[mg_l + "input_layernorm.weight"] = get(hf_l + "input_layernorm.weight", (h,))
        out[mg_l + "pre_mlp_layernorm.weight"] = get(hf_l + "post_attention_layernorm.weight", (h,))
        f = arch.ffn_hidden_size
        out[mg_l + "mlp.linear_fc1.weight"] = torch.cat(
            [get(hf_l + "mlp.gate_proj.weight", (f, h)), get(hf_l + "mlp.up_proj.weight", (f, h))]
        )
        out[mg_l + "mlp.linear_fc2.weight"] = get(hf_l + "mlp.down_proj.weight", (h, f))
    # A tensor we do not map is a feature we do not support (e.g. an o_proj bias): refuse it.
    ignorable = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    unused = sorted(k for k in set(hf) - used - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise CheckpointError(f"{source}: tensor {unused[0]} is not supported by this conversion")
    return {k: v.contiguous() for k, v in out.items()}


def megatron_to_hf(mg: dict[str, torch.Tensor], arch: LLMArch) -> dict[str, torch.Tensor]:
    h, heads, groups = arch.hidden_size, arch.num_attention_heads, arch.num_query_groups
    d = h // heads
    per_group = heads // groups
    out = {
        "model.embed_tokens.weight": mg["embedding.word_embeddings.weight"],
        "model.norm.weight": mg["decoder.final_layernorm.weight"],
    }
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = mg["output_layer.weight"]
    for i in range(arch.num_layers):
        hf_l, mg_l = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = mg[mg_l + "self_attention.linear_qkv.weight"].reshape(groups, (per_group + 2) * d, h)
        q, k, v = qkv.split([per_group * d, d, d], dim=1)
        out[hf_l + "self_attn.q_proj.weight"] = q.reshape(-1, h)
        out[hf_l + "self_attn.k_proj.weight"] = k.reshape(-1, h)
        out[hf_l + "self_attn.v_proj.weight"] = v.reshape(-1, h)
        if arch.qkv_bias:
            qb, kb, vb = (
                mg[mg_l + "self_attention.linear_qkv.bias"].reshape(groups, -1).split([per_group * d, d, d], dim=1)
            )
            out[hf_l + "self_attn.q_proj.bias"] = qb.reshape(-1)
            out[hf_l + "self_attn.k_proj.bias"] = kb.reshape(-1)
            out[hf_l + "self_attn.v_proj.bias"] = vb.reshape(-1)
        out[hf_l + "self_attn.o_proj.weight"] = mg[mg_l + "self_attention.linear_proj.weight"]
        out[hf_l + "input_layernorm.weight"] = mg[mg_l + "input_layernorm.weight"]
        out[hf_l + "post_attention_layernorm.weight"] = mg[mg_l + "pre_mlp_layernorm.weight"]
        gate, up = mg[mg_l + "mlp.linear_fc1.weight"].chunk(2)
        out[hf_l + "mlp.gate_proj.weight"] = gate
        out[hf_l + "mlp.up_proj.weight"] = up
        out[hf_l + "mlp.down_proj.weight"] = mg[mg_l + "mlp.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def save_hf_causal_lm(
    weights: dict[str, torch.Tensor], arch: LLMArch, out: str | Path, stop: list[int] | None = None
) -> None:
    """Our TP=1 LLM weights (local layer names) as a standard HF causal LM directory (transformers
    loads it); with `stop`, generation ends at those ids (EOS first, then the chat template's end
    of turn)."""
    hf = megatron_to_hf(weights, arch)
    params = hf_config_dict(arch)
    config = AutoConfig.for_model(params.pop("model_type"), **params, **({"eos_token_id": stop[0]} if stop else {}))
    model = AutoModelForCausalLM.from_config(config, dtype=next(iter(hf.values())).dtype)
    missing, unexpected = model.load_state_dict(hf, strict=False)
    missing = [k for k in missing if not (arch.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"export: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if stop:
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = stop, stop[0]
    model.save_pretrained(out, safe_serialization=True)


def read_arch(checkpoint: str | Path) -> LLMArch:
    path = Path(checkpoint) / ARCH_FILE
    try:
        return LLMArch(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a directory written by tools/convert_hf_checkpoint.py)") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def write_checkpoint(out: str | Path, arch: LLMArch, weights: dict[str, torch.Tensor]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS_FILE))
    (out / ARCH_FILE).write_text(json.dumps(dataclasses.asdict(arch), indent=2))


def partition_of(name: str) -> tuple[int, int] | None:
    """(dim, stride) of a GPTModel weight split by tensor parallelism; None when replicated.
    The same facts Megatron-Core records on its parameters (partition_dim, partition_stride)."""
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")):
        return 0, 1
    if name.endswith("linear_fc1.weight"):
        return 0, 2  # [gate; up]: each rank holds its chunk of both
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1, 1
    return None


def write_tp_shards(out: str | Path, weights: dict[str, torch.Tensor], tensor_parallel: int) -> None:
    folder = Path(out) / f"tp{tensor_parallel}"
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(tensor_parallel):
        local = {}
        for name, tensor in weights.items():
            split = partition_of(name)
            if split is not None:
                tensor = split_tensor(tensor, *split, rank, tensor_parallel)
            local[name] = tensor.contiguous()
        save_file(local, str(folder / f"rank{rank}.safetensors"))


def pipeline_chunk_weights(weights: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The whole model's weights, renamed for one pipeline chunk of it: its layers (numbered
    from 0 in the chunk), the embedding on the first stage, the final norm and output layer on
    the last (a tied output layer takes the embedding's weights)."""
    if model.pre_process and model.post_process:
        return weights
    layers = model.decoder.layers
    first = layers[0].layer_number - 1 if len(layers) else 0  # layer_number: global, from 1
    out = {}
    for name, tensor in weights.items():
        if name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers.") :].split(".", 1)
            if first <= int(index) < first + len(layers):
                out[f"decoder.layers.{int(index) - first}.{rest}"] = tensor
        elif name.startswith("embedding."):
            if model.pre_process:
                out[name] = tensor
        elif model.post_process:
            out[name] = tensor
    if model.post_process and model.share_embeddings_and_output_weights and not model.pre_process:
        out["output_layer.weight"] = weights["embedding.word_embeddings.weight"]
    return out


def load_llm_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Loads a converted checkpoint into this rank's GPTModel (or pipeline chunk of it): its
    pre-written shard for this TP size when there is one, else the full weights, sharded on the fly."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    # Converted weights carry the local spec's norm names; TE layers hold those norms inside
    # linear_qkv / linear_fc1. Untested: TE is installed neither here nor on the lent GPU machine.
    te_spec = any(name.endswith("layer_norm_weight") for name, _ in model.named_parameters())
    spec_names = te_layer_names if te_spec else (lambda weights: weights)
    shard_file = Path(checkpoint) / f"tp{tp}" / f"rank{rank}.safetensors"
    if tp > 1 and shard_file.is_file():
        local = spec_names(pipeline_chunk_weights(load_file(str(shard_file)), model))
        missing, unexpected = model.load_state_dict(local, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{shard_file}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return
    path = Path(checkpoint) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        load_full_state_dict(model, spec_names(pipeline_chunk_weights(load_file(str(path)), model)))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
