"""Samples -> offline token files (data/token_dataset.py), in shards that survive a killed job.

The samples are cut into shards of `shard_size`; each process of the running job takes every
W-th shard, writes it to OUT.shards/ and marks it done last, with its files' digests. A rerun
skips finished shards (one damaged since is written again), so an interrupted job resumes
without duplicating a sample, and the merged files are the same for any number of processes.
OUT.shards/manifest.json records what the shards are built from (the inputs with their images'
sizes and modification times, the ViQ tokenizer's configuration and weights, the text
tokenizer, the shard size, the format): a rerun that disagrees stops (ManifestMismatch)
instead of mixing shards. Rank 0 merges the shards into OUT.bin/.idx atomically
(TokenDatasetWriter), with OUT.report.jsonl (every skipped input and why) and, for codes,
OUT.codebook.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from viq_megatron.data.conversations import Sample, SampleError, read_conversations
from viq_megatron.data.images import ImageError, find_images
from viq_megatron.data.text import IMAGE_PLACEHOLDER, Turn
from viq_megatron.data.token_dataset import TokenDatasetWriter, codebook_counts, encode_token_sample, visual_bytes
from viq_megatron.models.codebook import codebook_summary
from viq_megatron.runtime.errors import InputError, read_text, writing

EXIT_SKIPPED = 3
MANIFEST_FORMAT = 2


class ManifestMismatch(InputError):
    """OUT.shards was built from something else than this run; one line saying what differs."""


def read_inputs(path: Path, root: str | None, allow_outside_root: bool) -> list:
    """Samples (or SampleErrors) from a JSON/JSONL file, or one sample per image of a folder
    (captioned by a same-named .txt file where there is one)."""
    if not path.is_dir():
        return list(read_conversations(path, root, allow_outside_root))
    samples = []
    for image in find_images([str(path)], allow_outside_root):
        if not isinstance(image, Path):
            samples.append(SampleError(str(image)))
            continue
        caption = image.with_suffix(".txt")
        try:
            turns = (
                (
                    Turn("user", f"{IMAGE_PLACEHOLDER}\nDescribe the image."),
                    Turn("assistant", read_text(caption, "caption").strip()),
                )
                if caption.is_file()
                else (Turn("user", IMAGE_PLACEHOLDER),)
            )
        except InputError as e:
            samples.append(SampleError(str(e)))
            continue
        samples.append(Sample(str(image), turns, (image,)))
    return samples


def write_shard(prefix: Path, items: list, tok, text_tok, features: bool) -> dict:
    """One shard's token files; its counts and the inputs it skipped (for its marker)."""
    writer = TokenDatasetWriter(prefix)
    stats = {"samples": 0, "images": 0, "patches": 0, "source_bytes": 0, "skipped": []}
    for item in items:
        if isinstance(item, SampleError):
            stats["skipped"].append(str(item))
            continue
        try:
            sample = encode_token_sample(item, tok, text_tok, features)
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


def manifest(items: list, tok, text_tok, shard_size: int, features: bool) -> dict:
    """What the output is built from (see the module docstring)."""

    def state(path) -> list:
        try:
            stat = os.stat(path)
        except OSError:
            return [str(path), None, None]
        return [str(path), stat.st_size, stat.st_mtime_ns]

    inputs = hashlib.sha256()
    for item in items:
        entry = (
            ["error", str(item)]
            if isinstance(item, SampleError)
            else [item.source, [[t.role, t.text] for t in item.turns], [state(p) for p in item.images]]
        )
        inputs.update(json.dumps(entry).encode() + b"\n")
    return {
        "format": MANIFEST_FORMAT,
        "samples": len(items),
        "inputs": inputs.hexdigest(),
        "tokenizer": tok.fingerprint(),
        "text_tokenizer": text_tok.fingerprint(),
        "shard_size": shard_size,
        "features": features,
    }


def check_manifest(shards_dir: Path, wanted: dict, out: Path) -> None:
    """Writes the manifest into a new shards folder; raises ManifestMismatch where one differs."""
    path = shards_dir / "manifest.json"
    if not path.is_file():
        if any(shards_dir.iterdir()):
            raise ManifestMismatch(
                f"{shards_dir}: shards without a manifest (another version's?); rerun with --overwrite to rebuild {out}"
            )
        path.with_suffix(".tmp").write_text(json.dumps(wanted, indent=1))
        os.replace(path.with_suffix(".tmp"), path)
        return
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestMismatch(f"{path}: unreadable ({e}); rerun with --overwrite to rebuild {out}") from None
    differ = [key for key in wanted if found.get(key) != wanted[key]]
    if differ:
        what = {
            "inputs": "the inputs (or their images) changed",
            "samples": "the number of inputs changed",
            "tokenizer": "another ViQ tokenizer",
            "text_tokenizer": "another text tokenizer",
            "shard_size": f"--shard-size was {found.get('shard_size')}",
            "format": "another format version",
            "features": "encoder features, not codes" if found.get("features") else "codes, not encoder features",
        }
        reasons = "; ".join(what[k] for k in differ)
        raise ManifestMismatch(
            f"{path}: {out} was started from something else ({reasons}); rerun with --overwrite to rebuild it"
        )


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
    print(
        f"warning: {prefix}.bin/.idx differ from {marker.name} (damaged since?); writing the shard again",
        file=sys.stderr,
    )
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
    if shard_size < 1:
        raise InputError(f"--shard-size: {shard_size} must be >= 1")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shards_dir = Path(f"{out}.shards")
    _agree_on_manifest(shards_dir, manifest(items, tok, text_tok, shard_size, features), out)
    num_shards = max(1, -(-len(items) // shard_size))
    mine = [k for k in range(num_shards) if k % world_size == rank]
    todo = [k for k in mine if not shard_finished(shards_dir / f"shard_{k:06d}")]
    start = time.perf_counter()
    images_done = _write_shards(shards_dir, items, shard_size, todo, tok, text_tok, features)
    seconds = time.perf_counter() - start
    if world_size > 1:
        dist.barrier()
    status = 0
    if rank == 0:
        with writing(f"{out}.bin"):
            status = merge(shards_dir, num_shards, out, tok, images_done, seconds, features)
    if world_size > 1:
        dist.barrier()  # the merged files exist before any rank reads them
    return status


def _agree_on_manifest(shards_dir: Path, wanted: dict, out: Path) -> None:
    """Rank 0 checks (or writes) the manifest; every rank raises the same ManifestMismatch."""
    problem = None
    if dist.get_rank() == 0:
        shards_dir.mkdir(parents=True, exist_ok=True)
        try:
            check_manifest(shards_dir, wanted, out)
        except ManifestMismatch as e:
            problem = str(e)
    if dist.get_world_size() > 1:
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem is not None:
        raise ManifestMismatch(problem)


def _write_shards(
    shards_dir: Path, items: list, shard_size: int, todo: list[int], tok, text_tok, features: bool
) -> int:
    """Shards `todo`, each marked done last (with its files' digests); the images encoded."""
    images_done = 0
    for k in tqdm(todo, desc="shards", disable=dist.get_rank() != 0, unit="shard"):
        with writing(shards_dir / f"shard_{k:06d}.bin"):
            stats = write_shard(
                shards_dir / f"shard_{k:06d}", items[k * shard_size : (k + 1) * shard_size], tok, text_tok, features
            )
        images_done += stats["images"]
        stats["files"] = shard_digests(shards_dir / f"shard_{k:06d}")
        marker = shards_dir / f"shard_{k:06d}.json"
        marker.with_suffix(".tmp").write_text(json.dumps(stats))
        os.replace(marker.with_suffix(".tmp"), marker)  # written last: the shard is complete
    return images_done


def merge(shards_dir: Path, num_shards: int, out: Path, tok, images_done: int, seconds: float, features: bool) -> int:
    """The shards -> OUT.bin/.idx, OUT.report.jsonl, OUT.codebook.json; the exit status."""
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
        "".join(
            json.dumps({"input": line.split(": ", 1)[0], "reason": line.split(": ", 1)[-1]}) + "\n" for line in skipped
        )
    )
    written = sum(Path(f"{out}{suffix}").stat().st_size for suffix in (".bin", ".idx"))
    print(
        f"{totals['samples']} samples, {totals['images']} images, {totals['patches']} patches "
        f"({'encoder features' if features else 'codes'}); {len(skipped)} inputs skipped (see {out}.report.jsonl)"
    )
    print(
        f"{written:,} bytes written for {totals['source_bytes']:,} bytes of source images "
        f"({written / max(totals['source_bytes'], 1):.2%}); "
        f"{images_done / max(seconds, 1e-9):.1f} images/s on rank 0 this run"
    )
    print(f"{visual_bytes(out) / max(totals['patches'], 1):,.0f} bytes per patch")
    if not features:
        write_codebook(out, tok)
    return EXIT_SKIPPED if skipped else 0


def write_codebook(out: Path, tok) -> None:
    """OUT.codebook.json: usage, perplexity and level histograms of the codes in OUT."""

    fsq = tok.visual.head.quantizer.fsq
    codebook = codebook_summary(codebook_counts(out, fsq.codebook_size), fsq)
    Path(f"{out}.codebook.json").write_text(json.dumps(codebook))
    if codebook:
        print(
            f"codebook: {codebook['codebook_usage']:.1%} of the {fsq.codebook_size} codes used, perplexity "
            f"{codebook['codebook_perplexity']:.0f} over {codebook['codes_seen']} codes (see {out}.codebook.json)"
        )
