"""SigLIP / SigLIP2 vision towers -> our NativeResolutionViT and attention-pooling head.

Reads two layouts:
- Hugging Face transformers: SiglipVisionModel (fixed resolution), Siglip2VisionModel
  (NaFlex, native resolution), or the `vision_model.*` of a full SigLIP model, with its
  config.json;
- timm / open_clip, which the ViQ reference loads: timm `VisionTransformer` names, bare or
  under `trunk.` / `visual.trunk.`; the head count is not in the weights (`num_heads`).
and writes our encoder directory:
    encoder.json        the EncoderConfig, and whether a pooling head is kept
    model.safetensors   encoder.* in our TP=1 layout; pooling_head.* (AttentionPooling)
One directory serves every tensor-parallel size: weights are split when loaded.

Layout facts the mapping rests on: fixed-resolution SigLIP embeds patches with a conv
[D, 3, p, p] and NaFlex with a linear over (p, p, 3)-flattened patches, our patch order;
the learned position grid is square, and NaFlex resizes it per image (bilinear,
antialiased) as our encoder does, which at the trained grid is the identity; Megatron
fuses q, k, v per head into linear_qkv ([q_h; k_h; v_h] for each head h).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from viq_megatron.config import EncoderConfig
from viq_megatron.models.files import WEIGHTS_FILE
from viq_megatron.models.hf_llm import CheckpointError, _expect
from viq_megatron.runtime.errors import first_line

CONFIG_FILE = "encoder.json"
ENCODER, POOLING = "encoder.", "pooling_head."


def _read_tensors(source: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or directory (safetensors, sharded or not; torch .bin/.pt)."""
    files = (
        [source]
        if source.is_file()
        else sorted(source.glob("*.safetensors"))
        or sorted([*source.glob("*.bin"), *source.glob("*.pt"), *source.glob("*.pth")])
    )
    if not files:
        raise CheckpointError(f"{source}: no .safetensors, .bin or .pt weights there")
    state = {}
    for file in files:
        try:
            loaded = (
                load_file(str(file))
                if file.suffix == ".safetensors"
                else torch.load(file, map_location="cpu", weights_only=True)
            )
        except Exception as e:  # noqa: BLE001 - both readers raise their own types
            raise CheckpointError(f"{file}: not a readable checkpoint ({first_line(e)})") from None
        state.update(loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {})
    return state


def _prefix(state: dict, suffix: str) -> str | None:
    """The prefix under which a layout's key lives (e.g. 'vision_model.'), None if absent."""
    return next((k[: -len(suffix)] for k in state if k.endswith(suffix)), None)


def _timm_to_hf(state: dict, prefix: str, source: str) -> dict[str, torch.Tensor]:
    """timm / open_clip names -> Hugging Face names (q, k, v and the pooling probe's q / kv split)."""
    renames = {
        "patch_embed.proj.": "embeddings.patch_embedding.",
        "norm.": "post_layernorm.",
        "attn_pool.norm.": "head.layernorm.",
        "attn_pool.mlp.": "head.mlp.",
        "attn_pool.proj.": "head.attention.out_proj.",
    }
    block = {"norm1.": "layer_norm1.", "norm2.": "layer_norm2.", "attn.proj.": "self_attn.out_proj.", "mlp.": "mlp."}
    out = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name == "pos_embed":
            out["embeddings.position_embedding.weight"] = tensor.reshape(-1, tensor.shape[-1])
        elif name == "attn_pool.latent":
            out["head.probe"] = tensor
        elif name.startswith("attn_pool.q.") or name.startswith("attn_pool.kv."):
            continue  # fused below
        elif name.startswith("blocks."):
            index, rest = name[len("blocks.") :].split(".", 1)
            layer = f"encoder.layers.{index}."
            if rest.startswith("attn.qkv."):
                for part, chunk in zip(("q", "k", "v"), tensor.chunk(3)):
                    out[f"{layer}self_attn.{part}_proj.{rest.rsplit('.', 1)[1]}"] = chunk
                continue
            mapped = next((new + rest[len(old) :] for old, new in block.items() if rest.startswith(old)), None)
            out[layer + (mapped or rest)] = tensor
        else:
            mapped = next((new + name[len(old) :] for old, new in renames.items() if name.startswith(old)), None)
            out[mapped or name] = tensor  # an unknown name is refused by the HF mapping
    for part in ("weight", "bias"):
        q, kv = state.get(f"{prefix}attn_pool.q.{part}"), state.get(f"{prefix}attn_pool.kv.{part}")
        if q is not None and kv is not None:
            out[f"head.attention.in_proj_{part}"] = torch.cat([q, kv])
        elif (q is None) != (kv is None):
            raise CheckpointError(f"{source}: tensor {prefix}attn_pool.{'q' if q is None else 'kv'}.{part} is missing")
    return out


def read_vision_checkpoint(
    source: str | Path, num_heads: int | None = None
) -> tuple[EncoderConfig, dict[str, torch.Tensor], bool]:
    """(encoder config, our weights: encoder.* and pooling_head.*, whether a pooling head is kept)."""
    source = Path(source)
    state = _read_tensors(source)
    config_file = (source if source.is_dir() else source.parent) / "config.json"
    if (prefix := _prefix(state, "embeddings.patch_embedding.weight")) is not None:
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: missing (Hugging Face layout needs its config)")
        hf = json.loads(config_file.read_text())
        hf = hf.get("vision_config", hf)
        heads = hf.get("num_attention_heads")
        eps, act = hf.get("layer_norm_eps", 1e-6), hf.get("hidden_act", "gelu_pytorch_tanh")
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    elif (prefix := _prefix(state, "patch_embed.proj.weight")) is not None:
        heads, eps, act = num_heads, 1e-6, "gelu_pytorch_tanh"  # timm's SigLIP towers
        state = _timm_to_hf(state, prefix, str(source))
    else:
        raise CheckpointError(
            f"{source}: neither a Hugging Face nor a timm SigLIP vision tower "
            f"(no embeddings.patch_embedding.weight or patch_embed.proj.weight)"
        )
    if not heads:
        raise CheckpointError(f"{source}: the number of attention heads is not in the checkpoint; pass it")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise CheckpointError(f"{config_file}: hidden_act {act} is not supported (our encoder uses tanh-GELU)")
    return _hf_to_ours(state, heads, eps, str(source))


def _hf_to_ours(
    hf: dict[str, torch.Tensor], heads: int, eps: float, source: str
) -> tuple[EncoderConfig, dict[str, torch.Tensor], bool]:
    used = set()

    def get(name, shape):
        used.add(name)
        return _expect(hf, name, shape, source)

    def present(name):  # a tensor whose shape defines the architecture
        if name not in hf:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        return hf[name]

    patch = present("embeddings.patch_embedding.weight")
    h = patch.shape[0]
    p = patch.shape[-1] if patch.dim() == 4 else math.isqrt(patch.shape[1] // 3)
    positions = present("embeddings.position_embedding.weight")
    side = math.isqrt(positions.shape[0])
    if side * side != positions.shape[0] or positions.shape[1:] != (h,):
        raise CheckpointError(
            f"{source}: tensor embeddings.position_embedding.weight has shape "
            f"{tuple(positions.shape)}, expected a square grid of {h}-wide positions"
        )
    layers = 1 + max((int(k.split(".")[2]) for k in hf if k.startswith("encoder.layers.")), default=-1)
    ffn = present("encoder.layers.0.mlp.fc1.weight").shape[0]
    if h % heads:
        raise CheckpointError(f"{source}: hidden size {h} is not divisible by {heads} attention heads")
    cfg = EncoderConfig(
        patch_size=p,
        hidden_size=h,
        num_layers=layers,
        num_attention_heads=heads,
        ffn_hidden_size=ffn,
        position_embedding_size=side,
        layernorm_epsilon=eps,
    )
    d = h // heads
    # conv [D, 3, p, p] -> linear over (p, p, 3)-flattened patches
    if patch.dim() == 4 and tuple(patch.shape) != (h, 3, p, p):
        raise CheckpointError(
            f"{source}: tensor embeddings.patch_embedding.weight has shape {tuple(patch.shape)}, "
            f"expected ({h}, 3, {p}, {p})"
        )
    flat = (
        patch.permute(0, 2, 3, 1).reshape(h, -1)
        if patch.dim() == 4
        else get("embeddings.patch_embedding.weight", (h, 3 * p * p))
    )
    used.update({"embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"})
    out = {
        "patch_embedding.weight": flat,
        "patch_embedding.bias": get("embeddings.patch_embedding.bias", (h,)),
        "position_embedding": positions,
        "transformer.final_layernorm.weight": get("post_layernorm.weight", (h,)),
        "transformer.final_layernorm.bias": get("post_layernorm.bias", (h,)),
    }
    for i in range(layers):
        hf_l, ours = f"encoder.layers.{i}.", f"transformer.layers.{i}."
        attn = hf_l + "self_attn."
        qkv = [get(f"{attn}{x}_proj.weight", (h, h)).reshape(heads, d, h) for x in "qkv"]
        out[ours + "self_attention.linear_qkv.weight"] = torch.cat(qkv, 1).reshape(3 * h, h)
        qkv_bias = [get(f"{attn}{x}_proj.bias", (h,)).reshape(heads, d) for x in "qkv"]
        out[ours + "self_attention.linear_qkv.bias"] = torch.cat(qkv_bias, 1).reshape(3 * h)
        for theirs, mine, shape in [
            ("self_attn.out_proj", "self_attention.linear_proj", (h, h)),
            ("layer_norm1", "input_layernorm", (h,)),
            ("layer_norm2", "pre_mlp_layernorm", (h,)),
            ("mlp.fc1", "mlp.linear_fc1", (ffn, h)),
            ("mlp.fc2", "mlp.linear_fc2", (h, ffn)),
        ]:
            out[f"{ours}{mine}.weight"] = get(f"{hf_l}{theirs}.weight", shape)
            out[f"{ours}{mine}.bias"] = get(f"{hf_l}{theirs}.bias", shape[:1])
    weights = {ENCODER + k: v for k, v in out.items()}
    has_head = "head.probe" in hf
    if has_head:
        for name, shape in [
            ("probe", (1, 1, h)),
            ("attention.in_proj_weight", (3 * h, h)),
            ("attention.in_proj_bias", (3 * h,)),
            ("attention.out_proj.weight", (h, h)),
            ("attention.out_proj.bias", (h,)),
            ("layernorm.weight", (h,)),
            ("layernorm.bias", (h,)),
            ("mlp.fc1.weight", (ffn, h)),
            ("mlp.fc1.bias", (ffn,)),
            ("mlp.fc2.weight", (h, ffn)),
            ("mlp.fc2.bias", (h,)),
        ]:
            weights[POOLING + name] = get("head." + name, shape)
    unused = sorted(set(hf) - used)
    if unused:
        raise CheckpointError(f"{source}: tensor {unused[0]} is not supported by this conversion")
    return cfg, {k: v.contiguous() for k, v in weights.items()}, has_head


def write_encoder_checkpoint(
    out: str | Path, cfg: EncoderConfig, weights: dict[str, torch.Tensor], has_head: bool
) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS_FILE))
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EncoderConfig.STARTING_FIELDS}
    (out / CONFIG_FILE).write_text(json.dumps({**fields, "pooling_head": has_head}, indent=2))


def read_encoder_checkpoint(
    directory: str | Path, prefix: str = ""
) -> tuple[EncoderConfig, bool, dict[str, torch.Tensor]]:
    """(encoder config, whether it has a pooling head, the weights under `prefix`, prefix removed)
    of a converted directory; only those tensors are read from disk."""
    directory = Path(directory)
    for file in (directory / CONFIG_FILE, directory / WEIGHTS_FILE):
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (convert with tools/convert_vision_checkpoint.py)")
    raw = json.loads((directory / CONFIG_FILE).read_text())
    has_head = bool(raw.pop("pooling_head", False))
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
        state = {k[len(prefix) :]: weights.get_tensor(k) for k in weights.keys() if k.startswith(prefix)}
    return EncoderConfig(**raw), has_head, state
