"""Curves over training steps from runs' metrics.jsonl: one panel per metric, one line per run.

    python tools/plot_metrics.py runs/quickstart/stage2_0/metrics.jsonl runs/quickstart/decoder/metrics.jsonl \\
        --metrics val:psnr val:ssim codebook:codebook_usage codebook:codebook_perplexity --out curves.png

A metric is SPLIT:KEY (the split a line was logged under: train, val, codebook). Runs whose
log lacks a metric are left out of its panel. The values are printed as a table too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_curve(path: Path, split: str, key: str) -> list[tuple[int, float]]:
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: {e}") from None
    return [(line["step"], line[key]) for line in lines if line.get("split") == split and key in line]


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[list[str]]]:
    """(the arguments, the metrics as [split, key] pairs)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path, help="metrics.jsonl files")
    parser.add_argument("--metrics", nargs="+", required=True, help="SPLIT:KEY, e.g. val:psnr")
    parser.add_argument("--out", required=True, type=Path, help="PNG")
    args = parser.parse_args(argv)
    metrics = [m.split(":", 1) for m in args.metrics]
    if any(len(m) != 2 for m in metrics):
        parser.exit(2, "error: --metrics takes SPLIT:KEY\n")
    return args, metrics


def main(argv: list[str] | None = None) -> int:
    import matplotlib  # optional: data

    args, metrics = parse(argv)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: data

    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, (split, key) in zip(axes[0], metrics):
        plot_metric(ax, args.logs, split, key)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


def plot_metric(ax, logs: list[Path], split: str, key: str) -> None:
    """One panel: a line per log that has the metric (printed too)."""
    for log in logs:
        curve = read_curve(log, split, key)
        if not curve:
            continue
        name = log.parent.name
        ax.plot(*zip(*curve), marker="o", markersize=3, label=name)
        print(f"{name} {split}:{key} " + " ".join(f"{step}:{value:.4g}" for step, value in curve))
    ax.set_title(f"{key} ({split})")
    ax.set_xlabel("step")
    if ax.lines:
        ax.legend(fontsize=8)
