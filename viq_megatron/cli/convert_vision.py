"""Convert a SigLIP / SigLIP2 vision tower into our encoder directory (model.encoder.init_from).

    python tools/convert_vision_checkpoint.py --source /models/siglip2-so400m-patch16-naflex --out ckpt/so400m
    python tools/convert_vision_checkpoint.py --source open_clip_model.safetensors --num-attention-heads 16 \\
        --out ckpt/so400m

`--source`: a Hugging Face directory (config.json + safetensors: SiglipVisionModel,
Siglip2VisionModel / NaFlex, or a full SigLIP model) or a timm / open_clip checkpoint
file or directory (timm names, bare or under trunk. / visual.trunk.; give the head
count). Keeps the attention-pooling head for stage 1's distillation. Prints the
`model.encoder` settings to put into a config. A missing or misshaped tensor is one
error line naming it (exit 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from viq_megatron.models.hf_llm import CheckpointError
from viq_megatron.models.siglip import read_vision_checkpoint, write_encoder_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="HF directory, or timm / open_clip file or directory")
    parser.add_argument("--out", required=True, help="our encoder directory (model.encoder.init_from)")
    parser.add_argument("--num-attention-heads", type=int, help="timm / open_clip layouts: the head count")
    args = parser.parse_args(argv)
    try:
        cfg, weights, has_head = read_vision_checkpoint(args.source, args.num_attention_heads)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_encoder_checkpoint(args.out, cfg, weights, has_head)
    params = sum(t.numel() for t in weights.values())
    print(
        f"wrote {args.out}: {params / 1e6:.1f}M parameters, {cfg.num_layers} layers, "
        f"{'with' if has_head else 'without'} the attention-pooling head"
    )
    print("model:\n  encoder:")
    for name, value in dataclasses.asdict(cfg).items():
        print(f"    {name}: {args.out if name == 'init_from' else value}")
    return 0
