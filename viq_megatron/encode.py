"""Encode images at native resolution with the ViT encoder, tensor-parallel.

    torchrun --nproc-per-node 2 -m viq_megatron.encode --config examples/encoder_tiny_cpu.yaml

Prints each image's native-resolution patch grid and a throughput line. Images are
packed into sequences of `data.tokens_per_pack` patches; packs are split over the
data-parallel ranks, and each pack is encoded by its tensor-parallel group.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from viq_megatron.runtime.extras import quiet_megatron_warnings

quiet_megatron_warnings()  # a program: before megatron-core loads (it warns while importing)

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from viq_megatron.config import Config, parse_command_line
from viq_megatron.data.embedded import shipped_photos
from viq_megatron.data.images import ImageError, NativeImage, find_images, load_native_image
from viq_megatron.data.packing import PackedImages, greedy_pack
from viq_megatron.models.flops import peak_flops, vit_forward_flops
from viq_megatron.models.provider import build_encoder, params_dtype
from viq_megatron.runtime.distributed import initialize, is_main_process, setup_logging, shutdown
from viq_megatron.runtime.errors import one_line_errors

log = logging.getLogger("viq_megatron.encode")


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
    my_packs = [
        PackedImages.from_images([images[i] for i in pack]).to(device, dtype) for pack in packs[dp_rank::dp_size]
    ]
    if is_main_process():
        for im in images:
            (w, h), (gh, gw) = im.source_size, im.grid
            log.info(
                "%-28s %5dx%-5d -> %5dx%-5d grid %3dx%-3d (%d patches)",
                im.source.split("/")[-1],
                w,
                h,
                gw * cfg.model.encoder.patch_size,
                gh * cfg.model.encoder.patch_size,
                gh,
                gw,
                im.num_patches,
            )
        log.info(
            "%d images in %d packs of <= %d patches; %d skipped",
            len(images),
            len(packs),
            cfg.data.tokens_per_pack,
            len(skipped),
        )

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
        log.info(
            "throughput: %.0f patches/s, %.2f images/s, %.2f TFLOP/s per device%s "
            "(%.3f s per pass; tp=%d dp=%d, %s, %s layers, %s)",
            patches / seconds,
            len(images) / seconds,
            flops / 1e12,
            f", MFU {flops / peak:.1%}" if peak else "",
            seconds,
            cfg.parallel.tensor_model_parallel_size,
            dp_size,
            str(dtype).removeprefix("torch."),
            impl,
            device.type,
        )
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
