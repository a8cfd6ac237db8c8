"""Images -> ViQ codes -> packed Megatron indexed datasets, once, offline.

    python tools/preprocess_images.py --input data.jsonl --tokenizer TOKENIZER_DIR \\
        --text-tokenizer .cache/smollm2-135m/tokenizer --out tokens/train
    torchrun --nproc-per-node 8 tools/preprocess_images.py ...       # data-parallel (srun works too)
    python tools/preprocess_images.py ... --features --out features/train   # the cached-features baseline

With `--features` the files hold the tokenizer's (frozen, text-aligned) encoder tokens in bf16
instead of its codes: what a continuous model with that encoder feeds its projector, for the
`cached` training stage, the baseline that also skips the encoder at training time (at
2 * width bytes per patch against the codes' 16).

Input: LLaVA-style JSON/JSONL (as for training) or a folder of images, each with an
optional caption in a same-named .txt file (a symbolic link out of the folder is refused
unless --allow-outside-root, a dangling one reported). Output: `OUT.bin` / `OUT.idx` (format
in viq_megatron/data/token_dataset.py), `OUT.report.jsonl` (every skipped input and why).

The samples are cut into shards of `--shard-size`; each process takes every W-th
shard, writes it to OUT.shards/ and marks it done last, with its files' digests. A rerun
skips finished shards (one damaged since is written again), so an interrupted job resumes
without duplicating a sample, and the merged files are
the same for any number of processes. OUT.shards/manifest.json records what the shards are
built from (the inputs with their images' sizes and modification times, the ViQ tokenizer's
configuration and weights, the text tokenizer, the shard size, the format): a rerun that
disagrees stops (exit 2) instead of mixing shards; `--overwrite` starts afresh.

Exit status: 0 all done; 3 done, some inputs skipped (see the report); 2 usage, input or
configuration error; 1 failed (e.g. a full disk; a rerun resumes). Errors are one line
naming the file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from viq_megatron.runtime.errors import InputError, check_writable, one_line_errors, read_text, writing  # noqa: E402

EXIT_SKIPPED = 3
MANIFEST_FORMAT = 2


class ManifestMismatch(InputError):
    """OUT.shards was built from something else than this run; one line saying what differs."""


def read_inputs(path: Path, root: str | None, allow_outside_root: bool) -> list:
    """Samples (or SampleErrors) from a JSON/JSONL file, or one sample per image of a folder."""
    from viq_megatron.data.conversations import Sample, SampleError, read_conversations
    from viq_megatron.data.images import find_images
    from viq_megatron.data.text import IMAGE_PLACEHOLDER, Turn

    if not path.is_dir():
        return list(read_conversations(path, root, allow_outside_root))
    samples = []
    for image in find_images([str(path)], allow_outside_root):
        if not isinstance(image, Path):
            samples.append(SampleError(str(image)))
            continue
        caption = image.with_suffix(".txt")
        try:
            turns = ((Turn("user", f"{IMAGE_PLACEHOLDER}\nDescribe the image."),
                      Turn("assistant", read_text(caption, "caption").strip())) if caption.is_file()
                     else (Turn("user", IMAGE_PLACEHOLDER),))
        except InputError as e:
            samples.append(SampleError(str(e)))
            continue
        samples.append(Sample(str(image), turns, (image,)))
    return samples


def load_text_tokenizer(path: Path):
    from viq_megatron.data.text import HFTokenizer, SentencePieceTokenizer

    return SentencePieceTokenizer(path) if path.suffix == ".model" else HFTokenizer(path)


def encode_sample(sample, tok, text_tok, features: bool = False):
    """A conversation with images -> TokenSample of codes, or with `features` of encoder tokens
    (raises ImageError for an unusable image)."""
    import numpy as np

    from viq_megatron.data.text import tokenize_conversation
    from viq_megatron.data.token_dataset import (ANSWER, CODES, FEATURES, GRID, TEXT, TokenSample,
                                                 features_to_int32)

    images = list(sample.images)
    encoded = (tok.encoder_features(images) if features else [e.codes for e in tok.encode(images)]) if images else []
    segments = []
    for piece in tokenize_conversation(text_tok, sample.turns).pieces:
        if piece[0] == "image":
            visual = encoded[piece[1]]
            if features:  # [grid_h, grid_w, width]
                segments.append((GRID, np.array(visual.shape[:2])))
                segments.append((FEATURES, features_to_int32(visual.reshape(-1, visual.shape[-1]))))
            else:  # [2 * grid_h, 2 * grid_w]
                segments.append((GRID, np.array([visual.shape[0] // 2, visual.shape[1] // 2])))
                segments.append((CODES, visual.reshape(-1).numpy()))
            continue
        ids, flags = piece[1], piece[2]
        start = 0
        for k in range(1, len(ids) + 1):  # runs of equal loss flags
            if k == len(ids) or flags[k] != flags[start]:
                segments.append((ANSWER if flags[start] else TEXT, np.array(ids[start:k])))
                start = k
    return TokenSample(segments)


def write_shard(prefix: Path, items: list, tok, text_tok, features: bool) -> dict:
    from viq_megatron.data.conversations import SampleError
    from viq_megatron.data.images import ImageError
    from viq_megatron.data.token_dataset import TokenDatasetWriter

    writer = TokenDatasetWriter(prefix)
    stats = {"samples": 0, "images": 0, "patches": 0, "source_bytes": 0, "skipped": []}
    for item in items:
        if isinstance(item, SampleError):
            stats["skipped"].append(str(item))
            continue
        try:
            sample = encode_sample(item, tok, text_tok, features)
        except ImageError as e:
            stats["skipped"].append(f"{item.source}: {e}")
            continue
        writer.add(sample)
        stats["samples"] += 1
        stats["images"] += sample.num_images
        stats["patches"] += sample.num_patches
        stats["source_bytes"] += sum(Path(p).stat().st_size for p in item.images)
    writer.finalize()
    return stats


def codebook_counts(prefix: Path, codebook_size: int):
    """How often each code occurs in a token dataset."""
    import torch

    from viq_megatron.data.token_dataset import CODES, TokenDataset

    data, counts = TokenDataset(prefix), torch.zeros(codebook_size, dtype=torch.int64)
    for index in range(len(data)):
        for mode, values in data[index].segments:
            if mode == CODES:
                counts += torch.bincount(torch.from_numpy(values).long(), minlength=codebook_size)
    return counts


def visual_bytes(prefix: Path) -> int:
    """Bytes a token dataset spends on images (codes or features; the grids aside)."""
    from viq_megatron.data.token_dataset import CODES, FEATURES, TokenDataset

    index = TokenDataset(prefix).data.index
    visual = (index.sequence_modes == CODES) | (index.sequence_modes == FEATURES)
    return int(index.sequence_lengths[visual].sum()) * index.dtype_size


def manifest(items: list, tok, text_tok, shard_size: int, features: bool) -> dict:
    """What the output is built from (see the module docstring)."""
    from viq_megatron.data.conversations import SampleError

    def state(path) -> list:
        try:
            stat = os.stat(path)
        except OSError:
            return [str(path), None, None]
        return [str(path), stat.st_size, stat.st_mtime_ns]

    inputs = hashlib.sha256()
    for item in items:
        entry = (["error", str(item)] if isinstance(item, SampleError) else
                 [item.source, [[t.role, t.text] for t in item.turns], [state(p) for p in item.images]])
        inputs.update(json.dumps(entry).encode() + b"\n")
    return {"format": MANIFEST_FORMAT, "samples": len(items), "inputs": inputs.hexdigest(),
            "tokenizer": tok.fingerprint(), "text_tokenizer": text_tok.fingerprint(), "shard_size": shard_size,
            "features": features}


def check_manifest(shards_dir: Path, wanted: dict, out: Path) -> None:
    """Writes the manifest into a new shards folder; raises ManifestMismatch where one differs."""
    path = shards_dir / "manifest.json"
    if not path.is_file():
        if any(shards_dir.iterdir()):
            raise ManifestMismatch(f"{shards_dir}: shards without a manifest (another version's?); rerun with "
                                   f"--overwrite to rebuild {out}")
        path.with_suffix(".tmp").write_text(json.dumps(wanted, indent=1))
        os.replace(path.with_suffix(".tmp"), path)
        return
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestMismatch(f"{path}: unreadable ({e}); rerun with --overwrite to rebuild {out}") from None
    differ = [key for key in wanted if found.get(key) != wanted[key]]
    if differ:
        what = {"inputs": "the inputs (or their images) changed", "samples": "the number of inputs changed",
                "tokenizer": "another ViQ tokenizer", "text_tokenizer": "another text tokenizer",
                "shard_size": f"--shard-size was {found.get('shard_size')}", "format": "another format version",
                "features": "encoder features, not codes" if found.get("features") else "codes, not encoder features"}
        reasons = "; ".join(what[k] for k in differ)
        raise ManifestMismatch(f"{path}: {out} was started from something else ({reasons}); rerun with --overwrite "
                               "to rebuild it")


def shard_digests(prefix: Path) -> dict:
    """sha256 of a shard's .bin and .idx (None for a missing file)."""
    digests = {}
    for suffix in (".bin", ".idx"):
        path = Path(f"{prefix}{suffix}")
        digests[suffix] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return digests


def shard_finished(prefix: Path) -> bool:
    """A shard is finished when its marker (written last) describes the files there: a shard
    truncated or altered since is written again, with a warning."""
    marker = Path(f"{prefix}.json")
    if not marker.is_file():
        return False
    try:
        described = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        described = None
    if described == shard_digests(prefix):
        return True
    print(f"warning: {prefix}.bin/.idx differ from {marker.name} (damaged since?); writing the shard again",
          file=sys.stderr)
    return False


def remove_outputs(out: Path) -> None:
    """Everything preprocess writes for OUT (for --overwrite)."""
    shutil.rmtree(f"{out}.shards", ignore_errors=True)
    for suffix in (".idx", ".bin", ".report.jsonl", ".codebook.json", ".writing.bin", ".writing.idx"):
        Path(f"{out}{suffix}").unlink(missing_ok=True)


def preprocess(items: list, tok, text_tok, out: Path, shard_size: int = 256, features: bool = False) -> int:
    """Writes OUT.bin/.idx (+ OUT.report.jsonl, and OUT.codebook.json: usage, perplexity and level
    histograms of the codes written; with `features` the encoder's tokens instead of codes, and no
    codebook) from samples (or SampleErrors); each process of the running
    job takes every W-th shard, rank 0 merges. Collective. Returns the exit status (0, or
    EXIT_SKIPPED where some inputs were skipped) on rank 0, 0 elsewhere."""
    import torch.distributed as dist
    from tqdm import tqdm

    if shard_size < 1:
        raise InputError(f"--shard-size: {shard_size} must be >= 1")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shards_dir = Path(f"{out}.shards")
    wanted = manifest(items, tok, text_tok, shard_size, features)
    problem = None
    if rank == 0:
        shards_dir.mkdir(parents=True, exist_ok=True)
        try:
            check_manifest(shards_dir, wanted, out)
        except ManifestMismatch as e:
            problem = str(e)
    if world_size > 1:
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise ManifestMismatch(problem)
    num_shards = max(1, -(-len(items) // shard_size))
    mine = [k for k in range(num_shards) if k % world_size == rank]
    todo = [k for k in mine if not shard_finished(shards_dir / f"shard_{k:06d}")]
    start, images_done = time.perf_counter(), 0
    for k in tqdm(todo, desc="shards", disable=rank != 0, unit="shard"):
        with writing(shards_dir / f"shard_{k:06d}.bin"):
            stats = write_shard(shards_dir / f"shard_{k:06d}", items[k * shard_size:(k + 1) * shard_size], tok,
                                text_tok, features)
        images_done += stats["images"]
        stats["files"] = shard_digests(shards_dir / f"shard_{k:06d}")
        marker = shards_dir / f"shard_{k:06d}.json"
        marker.with_suffix(".tmp").write_text(json.dumps(stats))
        os.replace(marker.with_suffix(".tmp"), marker)  # written last: the shard is complete
    seconds = time.perf_counter() - start
    if world_size > 1:
        dist.barrier()
    status = 0
    if rank == 0:
        with writing(f"{out}.bin"):
            status = _merge(shards_dir, num_shards, out, tok, images_done, seconds, features)
    if world_size > 1:
        dist.barrier()  # the merged files exist before any rank reads them
    return status


def _merge(shards_dir: Path, num_shards: int, out: Path, tok, images_done: int, seconds: float,
           features: bool) -> int:
    """The shards -> OUT.bin/.idx, OUT.report.jsonl, OUT.codebook.json; the exit status."""
    from viq_megatron.data.token_dataset import TokenDatasetWriter
    from viq_megatron.training.codebook import codebook_summary

    writer = TokenDatasetWriter(out)
    totals = {"samples": 0, "images": 0, "patches": 0, "source_bytes": 0}
    skipped = []
    for k in range(num_shards):
        writer.append_dataset(shards_dir / f"shard_{k:06d}")
        stats = json.loads((shards_dir / f"shard_{k:06d}.json").read_text())
        totals = {key: totals[key] + stats[key] for key in totals}
        skipped += stats["skipped"]
    writer.finalize()
    Path(f"{out}.report.jsonl").write_text(
        "".join(json.dumps({"input": line.split(": ", 1)[0], "reason": line.split(": ", 1)[-1]}) + "\n"
                for line in skipped))
    written = sum(Path(f"{out}{suffix}").stat().st_size for suffix in (".bin", ".idx"))
    print(f"{totals['samples']} samples, {totals['images']} images, {totals['patches']} patches "
          f"({'encoder features' if features else 'codes'}); {len(skipped)} inputs skipped (see {out}.report.jsonl)")
    print(f"{written:,} bytes written for {totals['source_bytes']:,} bytes of source images "
          f"({written / max(totals['source_bytes'], 1):.2%}); "
          f"{images_done / max(seconds, 1e-9):.1f} images/s on rank 0 this run")
    print(f"{visual_bytes(out) / max(totals['patches'], 1):,.0f} bytes per patch")
    if features:
        return EXIT_SKIPPED if skipped else 0
    fsq = tok.visual.head.quantizer.fsq
    codebook = codebook_summary(codebook_counts(out, fsq.codebook_size), fsq)
    Path(f"{out}.codebook.json").write_text(json.dumps(codebook))
    if codebook:
        print(f"codebook: {codebook['codebook_usage']:.1%} of the {fsq.codebook_size} codes used, perplexity "
              f"{codebook['codebook_perplexity']:.0f} over {codebook['codes_seen']} codes (see {out}.codebook.json)")
    return EXIT_SKIPPED if skipped else 0


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from viq_megatron.config import ParallelConfig
    from viq_megatron.runtime.distributed import initialize, shutdown
    from viq_megatron.tokenizer import ViQTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="LLaVA JSON/JSONL file or a folder of images")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a ViQTokenizer directory")
    parser.add_argument("--text-tokenizer", required=True, type=Path,
                        help="a Hugging Face tokenizer directory or a SentencePiece .model file")
    parser.add_argument("--out", required=True, type=Path, help="output prefix (OUT.bin, OUT.idx)")
    parser.add_argument("--root", help="image paths resolve under this folder (default: the input's folder)")
    parser.add_argument("--allow-outside-root", action="store_true")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--features", action="store_true",
                        help="store the encoder's tokens (bf16) instead of codes: the cached-features baseline")
    parser.add_argument("--overwrite", action="store_true", help="discard OUT's earlier output and shards first")
    args = parser.parse_args(argv)
    if not args.input.exists():
        parser.exit(2, f"error: {args.input}: no such file or directory\n")
    if args.shard_size < 1:
        parser.exit(2, f"error: --shard-size: {args.shard_size} must be >= 1\n")

    initialize(ParallelConfig(), seed=0)
    with one_line_errors(parser):
        check_writable(args.out)  # before any image is encoded
        tok = ViQTokenizer.load(args.tokenizer)
        text_tok = load_text_tokenizer(args.text_tokenizer)
        items = read_inputs(args.input, args.root, args.allow_outside_root)
        if args.overwrite and dist.get_rank() == 0:  # the others wait for rank 0's manifest in preprocess
            remove_outputs(args.out)
        status = preprocess(items, tok, text_tok, args.out, args.shard_size, args.features)
    shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
