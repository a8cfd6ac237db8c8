"""The model provider: the one place where a config becomes this rank's modules.

Like Megatron-LM's `model_provider`, it settles once what every builder needs: the
parameter dtype, the layer implementation (Transformer Engine or Megatron-Core local) with
FP8, and the device. It builds the LLM's pipeline chunks for this rank (pre_process /
post_process / vp_stage come from parallel_state), and assembles the three visual inputs
that training, the tokenizer, evaluation and the exports share. With `standalone`, the visual
parts are built for one process without any process group (specs.py), as the ViQ tokenizer
runs when used as a library:

    encoder_input    images -> encoder -> projector            (stage 1, continuous)
    quantized_input  images -> encoder -> ViQ head -> projector (stage 2, the tokenizer)
    code_input       offline codes -> ViQ head -> projector     (discrete)
    feature_input    offline encoder tokens -> projector        (cached, the cached-features baseline)

Nothing under models/ imports from training/.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import torch

from viq_megatron.config import Config, ConfigError, EncoderConfig, LLMArch
from viq_megatron.models.files import WEIGHTS_FILE, read_tokenizer_files
from viq_megatron.models.hf_llm import CheckpointError, load_llm_weights, read_arch
from viq_megatron.models.llm import build_llm_chunks
from viq_megatron.models.lora import add_lora
from viq_megatron.models.multimodal import (
    CachedFeatureVisualInput,
    CodeVisualInput,
    EncoderVisualInput,
    Projector,
    QuantizedVisualInput,
)
from viq_megatron.models.pixel_decoder import PixelDecoder
from viq_megatron.models.pooling import AttentionPooling
from viq_megatron.models.sharding import load_full_state_dict
from viq_megatron.models.siglip import ENCODER, POOLING, read_encoder_checkpoint
from viq_megatron.models.specs import STANDALONE, resolve_transformer_impl
from viq_megatron.models.viq_head import ViQHead
from viq_megatron.models.vit import NativeResolutionViT, encoder_transformer_config


def params_dtype(name: str) -> torch.dtype:
    """model.params_dtype: 'auto' is bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def device() -> torch.device:
    """Where every module is placed: this process's CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _placed(module: torch.nn.Module) -> torch.nn.Module:
    return module.to(device())


def _layers(cfg: Config, standalone: bool) -> tuple[str, int, str]:
    """(layer implementation, tensor-parallel size, fp8) of a visual part."""
    if standalone:
        return STANDALONE, 1, "off"
    return resolve_transformer_impl(cfg.model.transformer_impl), cfg.parallel.tensor_model_parallel_size, cfg.model.fp8


# ---------------------------------------------------------------- the LLM


def llm_arch(cfg: Config) -> LLMArch:
    """The LLM's sizes: the converted checkpoint's, else model.llm.arch."""
    return read_arch(cfg.model.llm.checkpoint) if cfg.model.llm.checkpoint else cfg.model.llm.arch


def build_llm_from_config(cfg: Config) -> list:
    """This rank's pipeline chunks of the LLM, with the pretrained weights and LoRA adapters."""
    llm_cfg, parallel = cfg.model.llm, cfg.parallel
    dtype = params_dtype(cfg.model.params_dtype)
    # The fused cross-entropy hands back bf16 logit gradients: bf16 models only (config.py).
    fused = cfg.model.fusions == "on" or (
        cfg.model.fusions == "auto" and torch.cuda.is_available() and dtype == torch.bfloat16
    )
    chunks = build_llm_chunks(
        llm_arch(cfg),
        parallel.tensor_model_parallel_size,
        dtype,
        resolve_transformer_impl(cfg.model.transformer_impl),
        cfg.model.fp8,
        (parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size),
        fused,
    )
    for llm in chunks:
        if llm_cfg.checkpoint:
            load_llm_weights(llm, llm_cfg.checkpoint)
        if llm_cfg.lora.rank > 0:
            add_lora(llm, llm_cfg.lora)
    return chunks


# ---------------------------------------------------------------- visual parts


def _pretrained_encoder(cfg: EncoderConfig, prefix: str) -> tuple[bool, dict[str, torch.Tensor]]:
    """(has a pooling head, its tensors under `prefix`) of model.encoder.init_from, whose sizes
    must be the config's."""
    saved, has_head, weights = read_encoder_checkpoint(cfg.init_from, prefix)
    for field in dataclasses.fields(saved):
        if field.name not in EncoderConfig.STARTING_FIELDS and getattr(saved, field.name) != getattr(cfg, field.name):
            raise ConfigError(
                f"model.encoder.{field.name}: {getattr(cfg, field.name)} differs from "
                f"{cfg.init_from}/encoder.json ({getattr(saved, field.name)})"
            )
    return has_head, weights


def build_encoder(cfg: Config, pretrained: bool = True, standalone: bool = False) -> tuple[NativeResolutionViT, str]:
    """(the encoder, its layer implementation), from model.encoder.init_from's weights when set
    and `pretrained` (split for this TP size)."""
    impl, tensor_parallel, fp8 = _layers(cfg, standalone)
    config = encoder_transformer_config(
        cfg.model.encoder, tensor_parallel, params_dtype(cfg.model.params_dtype), impl, fp8
    )
    # Norms and the patch embedding are created in fp32; the whole encoder runs in params_dtype.
    encoder = NativeResolutionViT(cfg.model.encoder, config, impl).to(config.params_dtype)
    if cfg.model.encoder.init_from and pretrained:
        _, weights = _pretrained_encoder(cfg.model.encoder, ENCODER)
        try:
            load_full_state_dict(encoder, {k: v.to(config.params_dtype) for k, v in weights.items()})
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{cfg.model.encoder.init_from}/{WEIGHTS_FILE}: {e}") from None
    return _placed(encoder), impl


def build_pooling_head(cfg: Config) -> AttentionPooling | None:
    """The frozen attention-pooling head of model.encoder.init_from, if it kept one."""
    enc = cfg.model.encoder
    if not enc.init_from:
        return None
    has_head, weights = _pretrained_encoder(enc, POOLING)
    if not has_head:
        return None
    head = AttentionPooling(
        enc.hidden_size,
        enc.num_attention_heads,
        enc.ffn_hidden_size,
        enc.layernorm_epsilon,
        params_dtype(cfg.model.params_dtype),
    )
    try:
        head.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{enc.init_from}/{WEIGHTS_FILE}: {str(e).splitlines()[-1].strip()}") from None
    return _placed(head.requires_grad_(False))


def build_head(cfg: Config, standalone: bool = False) -> ViQHead:
    impl, tensor_parallel, fp8 = _layers(cfg, standalone)
    return _placed(
        ViQHead(cfg.model.head, cfg.model.encoder, tensor_parallel, params_dtype(cfg.model.params_dtype), impl, fp8)
    )


def build_projector(cfg: Config, llm_hidden_size: int) -> Projector:
    return _placed(Projector(cfg.model.encoder.hidden_size, llm_hidden_size, params_dtype(cfg.model.params_dtype)))


def build_pixel_decoder(cfg: Config, standalone: bool = False) -> PixelDecoder:
    impl, tensor_parallel, _ = _layers(cfg, standalone)
    return _placed(
        PixelDecoder(
            cfg.model.decoder,
            cfg.model.head.subtoken_size,
            tensor_parallel,
            params_dtype(cfg.model.params_dtype),
            STANDALONE if standalone else "local",
        )
    )


# ---------------------------------------------------------------- visual inputs


def encoder_input(
    cfg: Config, llm_hidden_size: int, teacher: bool = False, standalone: bool = False
) -> EncoderVisualInput:
    """Encoder + projector; with `teacher`, stage 1's frozen fixed-resolution teacher (a second
    encoder: Megatron modules hold process groups, so no deepcopy) and the imported pooling head."""
    encoder, _ = build_encoder(cfg, standalone=standalone)
    return EncoderVisualInput(
        encoder,
        build_projector(cfg, llm_hidden_size),
        build_encoder(cfg, pretrained=False)[0] if teacher else None,
        build_pooling_head(cfg) if teacher else None,
    )


def quantized_input(cfg: Config, llm_hidden_size: int, standalone: bool = False) -> QuantizedVisualInput:
    encoder, _ = build_encoder(cfg, standalone=standalone)
    projector = build_projector(cfg, llm_hidden_size)  # before the head: the order of random initialisation
    return QuantizedVisualInput(encoder, build_head(cfg, standalone), projector)


def tokenizer_config(cfg: Config, directory: str) -> tuple[Config, int, dict[str, torch.Tensor]]:
    """`cfg` with the encoder, head and image rules of the ViQTokenizer in `directory` (its codes
    were made with them), the LLM width its projector feeds, and its weights."""
    saved, llm_hidden_size, weights = read_tokenizer_files(directory)
    return (
        replace(
            cfg,
            model=replace(cfg.model, encoder=saved.model.encoder, head=saved.model.head),
            data=replace(cfg.data, image=saved.data.image),
        ),
        llm_hidden_size,
        weights,
    )


def load_prefixed(module: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> None:
    """Loads the tensors named `prefix`... into `module` (full tensors, split for this TP size)."""
    load_full_state_dict(module, {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})


def tokenizer_projector(
    cfg: Config, tokenizer_cfg: Config, saved_width: int, weights: dict[str, torch.Tensor], llm_hidden_size: int
) -> Projector:
    """model.viq_tokenizer's projector (its weights, or a fresh one with model.projector: new)."""
    new_projector = cfg.model.projector == "new"
    if saved_width != llm_hidden_size and not new_projector:
        raise ConfigError(
            f"{cfg.model.viq_tokenizer}: its projector feeds width {saved_width}, the LLM has "
            f"{llm_hidden_size} (model.projector=new trains a new one)"
        )
    projector = build_projector(tokenizer_cfg, llm_hidden_size)
    if not new_projector:
        load_prefixed(projector, weights, "visual.projector.")
    return projector


def code_input(cfg: Config, llm_hidden_size: int) -> CodeVisualInput:
    """Discrete training on offline codes: model.viq_tokenizer's head (its weights) and projector
    embed them; no encoder is built."""
    tokenizer_cfg, saved_width, weights = tokenizer_config(cfg, cfg.model.viq_tokenizer)
    head = build_head(tokenizer_cfg)
    visual = CodeVisualInput(head, tokenizer_projector(cfg, tokenizer_cfg, saved_width, weights, llm_hidden_size))
    load_prefixed(visual.head, weights, "visual.head.")
    return visual


def feature_input(cfg: Config, llm_config) -> CachedFeatureVisualInput:
    """The cached-features baseline: model.viq_tokenizer's projector reads its (frozen) encoder's
    tokens, stored offline (tools/preprocess_images.py --features); no encoder is built."""
    tokenizer_cfg, saved_width, weights = tokenizer_config(cfg, cfg.model.viq_tokenizer)
    return CachedFeatureVisualInput(
        tokenizer_projector(cfg, tokenizer_cfg, saved_width, weights, llm_config.hidden_size), llm_config
    )
