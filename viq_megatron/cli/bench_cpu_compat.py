"""Overhead of the CPU compatibility layer: the same training step with it on and off.

    .venv/bin/python tools/bench_cpu_compat.py [--config examples/encoder_tiny_cpu.yaml] [key=value ...]

At TP=1 an encoder forward+backward never needs the patched calls, so the step also
runs with the layer switched off; the two are timed alternately on the same model.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch

from viq_megatron.config import parse_command_line
from viq_megatron.data.packing import PackedImages, greedy_pack
from viq_megatron.encode import load_images
from viq_megatron.models.provider import build_encoder
from viq_megatron.runtime import cpu_compat
from viq_megatron.runtime.distributed import initialize, shutdown


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    return parse_command_line(parser, argv, default_config="examples/encoder_tiny_cpu.yaml")


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    if torch.cuda.is_available():
        raise SystemExit("the CPU compatibility layer is inactive on CUDA machines: nothing to measure")
    cfg.parallel.tensor_model_parallel_size = 1  # one process: the encoder alone
    initialize(cfg.parallel, cfg.seed)
    encoder, _ = build_encoder(cfg)
    images, _ = load_images(cfg)
    pack = PackedImages.from_images(
        [images[i] for i in greedy_pack([im.num_patches for im in images], cfg.data.tokens_per_pack)[0]]
    )
    times = time_with_and_without(encoder, pack, args.repeats)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    per_call = timeit.timeit(torch.cuda.current_device, number=100_000) / 100_000
    print(
        f"encoder step ({pack.num_tokens} patches, fwd+bwd): with layer {on * 1e3:.1f} ms, "
        f"without {off * 1e3:.1f} ms, overhead {on / off - 1:+.2%}"
    )
    print(
        f"patched torch.cuda.current_device(): {per_call * 1e9:.0f} ns per call; "
        f"{len(cpu_compat.patched_names())} patches: {', '.join(cpu_compat.patched_names())}"
    )
    shutdown()
    return 0


def time_with_and_without(encoder, pack: PackedImages, repeats: int) -> dict[bool, list[float]]:
    """Seconds of a forward+backward step with the layer on (True) and off, alternately, after a
    warm-up step; the layer is left on."""

    def step() -> float:
        start = time.perf_counter()
        encoder.zero_grad(set_to_none=True)
        encoder(pack).square().mean().backward()
        return time.perf_counter() - start

    step()
    times = {True: [], False: []}
    for _ in range(repeats):
        for active in (True, False):
            cpu_compat.activate() if active else cpu_compat.deactivate()
            times[active].append(step())
    cpu_compat.activate()
    return times
