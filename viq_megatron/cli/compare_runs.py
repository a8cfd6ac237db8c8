"""Compare the deterministic outputs of two runs of the same job (e.g. the main job before and
after a change, on the same machine).

    python tools/compare_runs.py runs_before/quickstart runs/quickstart

Every `metrics.jsonl` found in both folders (same relative path) is compared row by row on its
non-timing values (losses and their terms, gradient norms, codebook statistics, PSNR/SSIM, lr);
and these artefacts byte for byte: `*.safetensors`, offline token files (`*.bin`, `*.idx`),
`*.codebook.json`, `reconstruction.json` and `bench_quality.md`. Timings (`*_s`, `*_per_s`,
TFLOP/s, MFU, memory) differ from run to run and are left out. Exit status 0 when all agree, 1
otherwise; each difference is printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARTEFACTS = ("*.safetensors", "*.bin", "*.idx", "*.codebook.json", "reconstruction.json", "bench_quality.md")
SKIPPED_DIRS = ("checkpoints", ".shards")  # checkpoints hold timestamps; shards are merged into the token files


def is_timing(key: str) -> bool:
    return key.endswith(("_s", "_per_s", "_per_device", "_gib")) or key == "mfu"


def metric_differences(a: Path, b: Path) -> list[str]:
    rows_a, rows_b = ([json.loads(line) for line in p.read_text().splitlines() if line.strip()] for p in (a, b))
    out = [f"{a}: {len(rows_a)} rows, {b}: {len(rows_b)}"] if len(rows_a) != len(rows_b) else []
    for x, y in zip(rows_a, rows_b):
        for key in sorted(set(x) | set(y)):
            if not is_timing(key) and x.get(key) != y.get(key):
                out.append(f"{a} step {x.get('step')} {x.get('split')} {key}: {x.get(key)} vs {y.get(key)}")
    return out


def compared_files(root: Path) -> set[Path]:
    found = {p for pattern in ("metrics.jsonl", *ARTEFACTS) for p in root.rglob(pattern) if p.is_file()}
    return {p.relative_to(root) for p in found if not any(part.endswith(SKIPPED_DIRS) for part in p.parts)}


def compare(a: Path, b: Path) -> tuple[int, list[str]]:
    """(files compared, differences)."""
    files_a, files_b = compared_files(a), compared_files(b)
    differences = [f"only in {a if f in files_a else b}: {f}" for f in sorted(files_a ^ files_b)]
    for name in sorted(files_a & files_b):
        if name.name == "metrics.jsonl":
            differences += metric_differences(a / name, b / name)
        elif (a / name).read_bytes() != (b / name).read_bytes():
            differences.append(f"{name}: the files differ")
    return len(files_a & files_b), differences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    for folder in (args.first, args.second):
        if not folder.is_dir():
            parser.exit(2, f"error: {folder}: not a folder\n")
    count, differences = compare(args.first, args.second)
    print("\n".join(differences) if differences else f"{count} files compared: identical")
    return 1 if differences else 0
