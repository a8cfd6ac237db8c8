"""Encode images at native resolution with the ViT encoder, tensor-parallel.

    torchrun --nproc-per-node 2 -m viq_megatron.encode --config examples/encoder_tiny_cpu.yaml

Prints each image's native-resolution patch grid and a throughput line. Images are
packed into sequences of `data.tokens_per_pack` patches; packs are split over the
data-parallel ranks, and each pack is encoded by its tensor-parallel group.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

import torch
import torch.distributed as dist

from viq_megatron.config import Config, ConfigError, EncoderConfig, parse_command_line
from viq_megatron.data.embedded import shipped_photos
from viq_megatron.data.images import ImageError, NativeImage, find_images, load_native_image
from viq_megatron.data.packing import PackedImages, greedy_pack
from viq_megatron.models.flops import peak_flops, vit_forward_flops
from viq_megatron.models.hf_llm import CheckpointError
from viq_megatron.models.pooling import AttentionPooling
from viq_megatron.models.sharding import load_full_state_dict
from viq_megatron.models.siglip import ENCODER, POOLING, WEIGHTS_FILE, read_encoder_checkpoint
from viq_megatron.models.specs import resolve_transformer_impl
from viq_megatron.models.vit import NativeResolutionViT, encoder_transformer_config
from viq_megatron.runtime.distributed import initialize, is_main_process, setup_logging, shutdown
from viq_megatron.runtime.errors import one_line_errors

log = logging.getLogger("viq_megatron.encode")


def params_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def _pretrained_encoder(cfg: EncoderConfig, prefix: str) -> tuple[bool, dict[str, torch.Tensor]]:
    """(has a pooling head, its tensors under `prefix`) of model.encoder.init_from, whose sizes
    must be the config's."""
    saved, has_head, weights = read_encoder_checkpoint(cfg.init_from, prefix)
    for field in dataclasses.fields(saved):
        if field.name != "init_from" and getattr(saved, field.name) != getattr(cfg, field.name):
            raise ConfigError(f"model.encoder.{field.name}: {getattr(cfg, field.name)} differs from "
                              f"{cfg.init_from}/encoder.json ({getattr(saved, field.name)})")
    return has_head, weights


def build_encoder(cfg: Config, pretrained: bool = True) -> tuple[NativeResolutionViT, str]:
    """The encoder, from model.encoder.init_from's weights when set and `pretrained` (split for
    this TP size)."""
    impl = resolve_transformer_impl(cfg.model.transformer_impl)
    config = encoder_transformer_config(cfg.model.encoder, cfg.parallel.tensor_model_parallel_size,
                                        params_dtype(cfg.model.params_dtype), impl, cfg.model.fp8)
    # Norms and the patch embedding are created in fp32; the whole encoder runs in params_dtype.
    encoder = NativeResolutionViT(cfg.model.encoder, config, impl).to(config.params_dtype)
    if cfg.model.encoder.init_from and pretrained:
        _, weights = _pretrained_encoder(cfg.model.encoder, ENCODER)
        try:
            load_full_state_dict(encoder, {k: v.to(config.params_dtype) for k, v in weights.items()})
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{cfg.model.encoder.init_from}/{WEIGHTS_FILE}: {e}") from None
    return (encoder.cuda() if torch.cuda.is_available() else encoder), impl


def build_pooling_head(cfg: Config) -> AttentionPooling | None:
    """The frozen attention-pooling head of model.encoder.init_from, if it kept one."""
    enc = cfg.model.encoder
    if not enc.init_from:
        return None
    has_head, weights = _pretrained_encoder(enc, POOLING)
    if not has_head:
        return None
    head = AttentionPooling(enc.hidden_size, enc.num_attention_heads, enc.ffn_hidden_size, enc.layernorm_epsilon,
                            params_dtype(cfg.model.params_dtype))
    try:
        head.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{enc.init_from}/{WEIGHTS_FILE}: {str(e).splitlines()[-1].strip()}") from None
    head.requires_grad_(False)
    return head.cuda() if torch.cuda.is_available() else head


def load_images(cfg: Config) -> tuple[list[NativeImage], list[str]]:
    """All readable images, and one line per image that was skipped."""
    paths = find_images(cfg.data.images) if cfg.data.images else shipped_photos()
    images, skipped = [], []
    for path in paths:
        if isinstance(path, ImageError):
            skipped.append(str(path))
            continue
        try:
            images.append(load_native_image(path, cfg.data.image, cfg.model.encoder.patch_size))
        except ImageError as e:
            skipped.append(str(e))
    return images, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _, cfg = parse_command_line(parser, argv)

    from megatron.core import parallel_state

    setup_logging(initialize(cfg.parallel, cfg.seed).rank)
    with one_line_errors(parser):  # settings only checkable on this machine (TE, FP8), a bad checkpoint or path
        encoder, impl = build_encoder(cfg)
        images, skipped = load_images(cfg)
    encoder.eval()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = params_dtype(cfg.model.params_dtype)

    for line in skipped:
        log.warning("skipped %s", line)
    packs = greedy_pack([im.num_patches for im in images], cfg.data.tokens_per_pack)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    my_packs = [PackedImages.from_images([images[i] for i in pack]).to(device, dtype)
                for pack in packs[dp_rank::dp_size]]
    if is_main_process():
        for im in images:
            (w, h), (gh, gw) = im.source_size, im.grid
            log.info("%-28s %5dx%-5d -> %5dx%-5d grid %3dx%-3d (%d patches)", im.source.split("/")[-1],
                     w, h, gw * cfg.model.encoder.patch_size, gh * cfg.model.encoder.patch_size, gh, gw,
                     im.num_patches)
        log.info("%d images in %d packs of <= %d patches; %d skipped", len(images), len(packs),
                 cfg.data.tokens_per_pack, len(skipped))

    def encode_all() -> None:
        for pack in my_packs:
            encoder(pack)
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(cfg.benchmark.warmup_passes):
            encode_all()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(cfg.benchmark.timed_passes):
            encode_all()
        dist.barrier()
        seconds = (time.perf_counter() - start) / max(cfg.benchmark.timed_passes, 1)

    patches = sum(im.num_patches for im in images)
    world = dist.get_world_size()
    flops = vit_forward_flops(cfg.model.encoder, [im.num_patches for im in images]) / seconds / world
    peak = peak_flops(device)
    if is_main_process():
        log.info("throughput: %.0f patches/s, %.2f images/s, %.2f TFLOP/s per device%s "
                 "(%.3f s per pass; tp=%d dp=%d, %s, %s layers, %s)",
                 patches / seconds, len(images) / seconds, flops / 1e12,
                 f", MFU {flops / peak:.1%}" if peak else "", seconds, cfg.parallel.tensor_model_parallel_size,
                 dp_size, str(dtype).removeprefix("torch."), impl, device.type)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
