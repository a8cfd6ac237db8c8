"""Codebook usage against what the images allow: a tokenizer's codes beside the PCA-5 cap.

    python tools/codebook_cap.py --tokenizer runs/quickstart/tokenizer \\
        --input runs/quickstart/stage1/embedded_data/train.jsonl \\
        [--codebook runs/quickstart/tokens/train.codebook.json] --out runs/quickstart/tokens/codebook_cap.json

Reads every image of --input's conversations (as tools/preprocess_images.py encodes them: at the
tokenizer's native-resolution rules, a repeated image each time) and codes its 8x8 blocks by
their principal components on the tokenizer's FSQ grid (viq_megatron/benchmarks/codebook_cap.py).
Prints the cap's usage and perplexity, and beside them the tokenizer's from --codebook (the
summary tools/preprocess_images.py wrote for the same input) as shares of the cap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from viq_megatron.benchmarks.codebook_cap import pca_cap
from viq_megatron.data.conversations import SampleError, read_conversations
from viq_megatron.data.images import ImageError, load_native_image
from viq_megatron.models.files import read_tokenizer_config
from viq_megatron.models.quantizers import FSQ, FSQ_PRESETS
from viq_megatron.runtime.errors import check_writable


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, type=Path, help="a ViQTokenizer directory")
    parser.add_argument("--input", required=True, type=Path, help="conversations (JSON / JSONL) with images")
    parser.add_argument("--codebook", type=Path, help="OUT.codebook.json of tools/preprocess_images.py")
    parser.add_argument("--out", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    check_writable(args.out)
    cfg, _ = read_tokenizer_config(args.tokenizer)
    fsq, patch = FSQ(FSQ_PRESETS[cfg.model.head.codebook]), cfg.model.encoder.patch_size
    images = []
    for sample in read_conversations(args.input):
        if isinstance(sample, SampleError):
            print(f"skipped sample {sample}", file=sys.stderr)
            continue
        for path in sample.images:
            try:
                images.append(load_native_image(path, cfg.data.image, patch))
            except ImageError as e:
                print(f"skipped image {e}", file=sys.stderr)
    cap = pca_cap(images, patch, fsq)
    report = {"cap": cap, "images": len(images)}
    line = f"PCA-5 cap over {len(images)} images: {cap['codebook_usage']:.1%} of {fsq.codebook_size} codes, "
    line += f"perplexity {cap['codebook_perplexity']:.0f}"
    if args.codebook is not None:
        codes = json.loads(args.codebook.read_text())
        report["tokenizer"] = codes
        report["usage_of_cap"] = codes["codebook_usage"] / cap["codebook_usage"]
        line += (
            f"; the tokenizer: {codes['codebook_usage']:.1%} ({report['usage_of_cap']:.0%} of the cap), "
            f"perplexity {codes['codebook_perplexity']:.0f}"
        )
    args.out.write_text(json.dumps(report, indent=2))
    print(line)
    return 0
