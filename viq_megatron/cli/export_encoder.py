"""Export a trained encoder as an encoder directory, the format the SigLIP2 converter writes.

    python tools/export_encoder.py --config examples/encoder_pretrain_tiny_cpu.yaml \\
        --checkpoint runs/encoder_pretrain --out pretrained/tiny_scene_encoder

`--checkpoint` is a run (or one of its checkpoints) whose model holds `visual.encoder`: an
encoder pretraining, stage 1 or a continuous run. The config gives the encoder's sizes. The
directory (encoder.json, model.safetensors) is what `model.encoder.init_from` loads, as it loads
a converted SigLIP2; its sha256 is printed for the model card.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
import torch.distributed as dist

from viq_megatron.config import ParallelConfig, parse_command_line
from viq_megatron.models.files import WEIGHTS_FILE
from viq_megatron.models.provider import build_encoder
from viq_megatron.models.siglip import ENCODER, write_encoder_checkpoint
from viq_megatron.runtime.distributed import initialize, shutdown
from viq_megatron.runtime.errors import check_writable, one_line_errors
from viq_megatron.training.checkpoint import load_shared_weights


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="stored dtype (loading casts to the run's)"
    )
    args, cfg = parse_command_line(parser, argv, required=False)
    cfg.model.encoder.init_from = ""  # the weights come from --checkpoint
    return parser, args, cfg


def main(argv: list[str] | None = None) -> int:
    parser, args, cfg = parse(argv)
    check_writable(args.out / WEIGHTS_FILE)
    runtime = not dist.is_initialized()  # checkpoints are read through Megatron's runtime
    if runtime:
        initialize(ParallelConfig(), cfg.seed)
    with one_line_errors(parser):
        encoder, _ = build_encoder(cfg, pretrained=False)
        loaded, expected = load_shared_weights([encoder], args.checkpoint, "visual.encoder.")
        if loaded < expected:
            parser.exit(2, f"error: {args.checkpoint}: holds {loaded} of the {expected} tensors of visual.encoder\n")
        dtype = getattr(torch, args.dtype)
        weights = {
            ENCODER + k: v.to(dtype) if v.is_floating_point() else v
            for k, v in encoder.state_dict().items()
            if not k.endswith("_extra_state")
        }
        write_encoder_checkpoint(args.out, cfg.model.encoder, weights, has_head=False)
    if runtime:
        shutdown()
    digest = hashlib.sha256((args.out / WEIGHTS_FILE).read_bytes()).hexdigest()
    print(f"wrote {args.out} ({loaded} tensors); {WEIGHTS_FILE} sha256 {digest}")
    return 0
