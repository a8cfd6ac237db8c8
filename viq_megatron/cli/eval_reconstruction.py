"""Reconstruction quality of a ViQTokenizer: PSNR / SSIM at native resolution, PNG grids.

    python tools/eval_reconstruction.py --tokenizer TOKENIZER_DIR [--images PATH ...] [--max-pixels N] --out recon/

Default images: the photos shipped inside scikit-image / scikit-learn / matplotlib; the last
few of them (viq_megatron.data.embedded.VALIDATION_PHOTOS) are held out of every training
stage, and their mean is reported on its own. Each image is compared at its native-resolution
size: the tokenizer's resize, or with `--max-pixels` a budget of that many pixels (e.g. 65536,
256x256, the resolution of the paper's ImageNet numbers). `recon/grid.png` shows originals
beside their reconstructions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from viq_megatron.data.embedded import VALIDATION_PHOTOS, shipped_photos
from viq_megatron.data.images import ImageError, find_images, native_size, open_rgb
from viq_megatron.models.pixel_decoder import psnr, ssim
from viq_megatron.tokenizer import ViQTokenizer


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--images", nargs="*")
    parser.add_argument(
        "--max-pixels",
        type=int,
        help="pixel budget of the native-resolution size (default: the tokenizer's data.image.max_pixels)",
    )
    parser.add_argument("--out", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    tok = load_tokenizer(args.tokenizer, args.max_pixels)
    paths = find_images(args.images) if args.images else shipped_photos()
    for problem in [p for p in paths if isinstance(p, ImageError)]:
        print(f"skipped {problem}", file=sys.stderr)
    paths = [p for p in paths if not isinstance(p, ImageError)]
    held_out = set() if args.images else {p.name for p in paths[-VALIDATION_PHOTOS:]}
    rows, pairs = score(tok, paths, held_out)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, chosen in (("mean", rows), ("held_out_mean", [r for r in rows if r["held_out"]])):
        if chosen:
            summary[name] = {k: round(sum(r[k] for r in chosen) / len(chosen), 4) for k in ("psnr", "ssim")}
            print(
                f"{name.replace('_', ' ')} over {len(chosen)} images: PSNR {summary[name]['psnr']:.2f} dB, "
                f"SSIM {summary[name]['ssim']:.3f}"
            )
    (args.out / "reconstruction.json").write_text(json.dumps({"images": rows, **summary}, indent=2))
    save_grid(pairs, args.out / "grid.png")
    print(f"wrote {args.out / 'grid.png'} and {args.out / 'reconstruction.json'}")
    return 0


def load_tokenizer(path: Path, max_pixels: int | None):
    """The ViQTokenizer, its native-resolution budget set to `max_pixels` where given."""
    tok = ViQTokenizer.load(path)
    if max_pixels:
        image = tok.cfg.data.image
        tok.cfg.data.image = dataclasses.replace(
            image, max_pixels=max_pixels, max_source_pixels=max(image.max_source_pixels, max_pixels)
        )
    return tok


def score(tok, paths: list, held_out: set[str]) -> tuple[list[dict], list]:
    """Each image's PSNR / SSIM against its reconstruction at the native-resolution size
    (printed); (the rows, the (original, reconstruction) pairs)."""
    rules = tok.cfg.data.image
    encoded = tok.encode(paths)
    decoded = tok.decode([e.codes for e in encoded])
    rows, pairs = [], []
    for path, enc, recon in zip(paths, encoded, decoded):
        original = open_rgb(path, rules)
        original = original.resize(
            native_size(
                original.width, original.height, tok.cfg.model.encoder.patch_size, rules.min_pixels, rules.max_pixels
            ),
            Image.Resampling.BICUBIC,
        )
        a = torch.from_numpy(np.asarray(original, dtype=np.float32) / 255).permute(2, 0, 1)
        b = torch.from_numpy(np.asarray(recon, dtype=np.float32) / 255).permute(2, 0, 1)
        rows.append(
            {
                "image": Path(path).name,
                "size": list(enc.size),
                "codes": int(enc.codes.numel()),
                "psnr": round(psnr(b, a).item(), 3),
                "ssim": round(ssim(b, a).item(), 4),
                "held_out": Path(path).name in held_out,
            }
        )
        pairs.append((original, recon))
        print(
            f"{rows[-1]['image']:28s} {enc.size[0]:4d}x{enc.size[1]:<4d} PSNR {rows[-1]['psnr']:6.2f} dB "
            f"SSIM {rows[-1]['ssim']:.3f}{'  (held out)' if rows[-1]['held_out'] else ''}"
        )
    return rows, pairs


def save_grid(pairs: list, path: Path) -> None:
    """Thumbnails, original | reconstruction per row."""
    height = 160
    thumbs = [
        (
            o.resize((max(1, o.width * height // o.height), height)),
            r.resize((max(1, r.width * height // r.height), height)),
        )
        for o, r in pairs
    ]
    width = max(o.width + r.width for o, r in thumbs) + 8
    grid = Image.new("RGB", (width, len(thumbs) * (height + 4)), (255, 255, 255))
    for k, (o, r) in enumerate(thumbs):
        grid.paste(o, (0, k * (height + 4)))
        grid.paste(r, (o.width + 8, k * (height + 4)))
    grid.save(path)
