"""Export a trained ViQ tokenizer (stage-2 head, optionally a pixel decoder) as a ViQTokenizer directory.

    python tools/export_tokenizer.py --config examples/stage2_tiny_cpu.yaml model.head.quantizer=fsq \\
        --checkpoint runs/quickstart/stage2_2 [--decoder-checkpoint runs/quickstart/decoder] --out tokenizer/

`--checkpoint` is a stage-2 run (or one of its checkpoints): encoder, head and projector.
`--decoder-checkpoint` is a decoder-stage run. The config (file and/or overrides) gives
the sizes; it must describe an fsq head.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from viq_megatron.config import ParallelConfig, parse_command_line
from viq_megatron.models.provider import llm_arch
from viq_megatron.runtime.distributed import initialize, shutdown
from viq_megatron.runtime.errors import one_line_errors
from viq_megatron.tokenizer import ViQTokenizer
from viq_megatron.training.checkpoint import load_shared_weights


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--decoder-checkpoint", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args, cfg = parse_command_line(parser, argv, required=False)
    if args.decoder_checkpoint is None:
        cfg.model.decoder = None
    return parser, args, cfg


def main(argv: list[str] | None = None) -> int:
    parser, args, cfg = parse(argv)

    # Checkpoints are read through Megatron's runtime (one process here, unless a caller runs one).
    runtime = not dist.is_initialized()
    if runtime:
        initialize(ParallelConfig(), cfg.seed)
    with one_line_errors(parser):
        tok = ViQTokenizer(cfg, llm_arch(cfg).hidden_size)
        load_weights(parser, tok, args.checkpoint, args.decoder_checkpoint)
        tok.save(args.out)
    if runtime:
        shutdown()
    print(f"wrote {args.out}")
    return 0


def load_weights(parser: argparse.ArgumentParser, tok, checkpoint: Path, decoder_checkpoint: Path | None) -> None:
    """The tokenizer's visual input (and pixel decoder) from the runs' checkpoints; exit 2 where
    one lacks tensors."""
    sources = [(tok.visual, "visual.", checkpoint)]
    if decoder_checkpoint is not None:
        sources.append((tok.decoder, "decoder.", decoder_checkpoint))
    for module, prefix, path in sources:
        loaded, expected = load_shared_weights([module], path, prefix)
        if loaded < expected:
            parser.exit(2, f"error: {path}: holds {loaded} of the {expected} tensors of {prefix.rstrip('.')}\n")
        print(f"{path}: {loaded} tensors")
