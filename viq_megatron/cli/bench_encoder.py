"""Packed native-resolution encoding vs padded batches: every image padded to the largest,
and the stronger length-bucketed batches (images sorted by length, each batch padded to its
own largest).

    .venv/bin/python tools/bench_encoder.py [--config examples/encoder_tiny_cpu.yaml] [key=value ...]

All paths run the same encoder weights on the same images (the embedded photo mix by
default) in one process, alternating, within the same token budget per forward
(data.tokens_per_pack), and count only real (non-padding) patches.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from viq_megatron.config import parse_command_line
from viq_megatron.data.packing import PackedImages, greedy_pack
from viq_megatron.encode import load_images
from viq_megatron.models.provider import build_encoder, params_dtype
from viq_megatron.runtime.distributed import initialize, shutdown


def padded_forward(encoder, images, device, dtype) -> torch.Tensor:
    """One batch, every image zero-padded to the largest; padding keys masked out of attention."""
    longest = max(im.num_patches for im in images)
    patches = torch.stack([F.pad(im.patches, (0, 0, 0, longest - im.num_patches)) for im in images])
    positions = [encoder.position_embeddings(torch.tensor([im.grid])) for im in images]
    positions = torch.stack([F.pad(p, (0, 0, 0, longest - p.shape[0])) for p in positions])
    hidden = encoder.patch_embedding(patches.to(device, dtype)) + positions
    is_pad = (
        torch.arange(longest, device=device)[None, :]
        >= torch.tensor([im.num_patches for im in images], device=device)[:, None]
    )
    mask = is_pad[:, None, None, :].expand(-1, 1, longest, -1)  # True = masked, Megatron's convention
    return encoder.transformer(hidden_states=hidden.transpose(0, 1).contiguous(), attention_mask=mask)


def bucketed(images: list, budget: int) -> list[list]:
    """Length-sorted batches: a batch grows while (its images x its longest) fits the budget."""
    buckets = []
    for image in sorted(images, key=lambda im: im.num_patches):
        if buckets and (len(buckets[-1]) + 1) * image.num_patches <= budget:
            buckets[-1].append(image)
        else:
            buckets.append([image])
    return buckets


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    return parse_command_line(parser, argv, default_config="examples/encoder_tiny_cpu.yaml")


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    cfg.parallel.tensor_model_parallel_size = 1  # one process: the encoder alone
    initialize(cfg.parallel, cfg.seed)
    encoder, impl = build_encoder(cfg)
    encoder.eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = params_dtype(cfg.model.params_dtype)
    images, skipped = load_images(cfg)
    budget = cfg.data.tokens_per_pack
    packs = [
        PackedImages.from_images([images[i] for i in pack]).to(device, dtype)
        for pack in greedy_pack([im.num_patches for im in images], budget)
    ]
    longest = max(im.num_patches for im in images)
    # The padded batch holds as many padded slots as fit the same token budget per forward.
    per_batch = max(1, budget // longest)
    batches = [images[i : i + per_batch] for i in range(0, len(images), per_batch)]
    buckets = bucketed(images, budget)
    padded = functools.partial(padded_forward, encoder, device=device, dtype=dtype)
    runs = {
        "packed": forwards(encoder, packs),
        "padded": forwards(padded, batches),
        "bucketed": forwards(padded, buckets),
    }
    packed_s, padded_s, bucketed_s = (statistics.median(t) for t in time_runs(runs, args.repeats, device).values())
    real = sum(im.num_patches for im in images)
    computed = sum(len(b) * max(im.num_patches for im in b) for b in buckets)
    print(
        f"{len(images)} images ({len(skipped)} skipped), {real} real patches, largest {longest}; "
        f"{impl} layers, {str(dtype).removeprefix('torch.')}, {device.type}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"packed : {len(packs)} packs of <= {budget} patches, {packed_s:.3f} s, {real / packed_s:,.0f} patches/s")
    print(
        f"padded : {len(batches)} batches of <= {per_batch} images x {longest}, {padded_s:.3f} s, "
        f"{real / padded_s:,.0f} patches/s, {1 - real / (longest * len(images)):.1%} of computed tokens are padding"
    )
    print(
        f"bucketed: {len(buckets)} length-sorted batches, {bucketed_s:.3f} s, {real / bucketed_s:,.0f} patches/s, "
        f"{1 - real / computed:.1%} of computed tokens are padding"
    )
    print(f"packed / padded throughput: {padded_s / packed_s:.2f}x; packed / bucketed: {bucketed_s / packed_s:.2f}x")
    shutdown()
    return 0


def forwards(forward, inputs: list):
    """A run: `forward` over each input in turn (each output dropped before the next forward)."""

    def run() -> None:
        for x in inputs:
            forward(x)

    return run


def time_runs(runs: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each run, `repeats` times in turns after one warm-up each, without gradients."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    return times
