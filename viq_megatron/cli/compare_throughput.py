"""Compare training throughput logs: a steady-state table and a PNG plot.

    python tools/compare_throughput.py runs/continuous/metrics.jsonl runs/discrete/metrics.jsonl \\
        [--skip 2] [--plot throughput.png]

Reads the per-step `train` lines of each metrics.jsonl (written by the training loop),
drops the first `--skip` steps (warm-up), and reports medians: step time and its
phases (data, visual inputs, LLM forward/backward, optimizer), samples/s, tokens/s,
TFLOP/s per device, MFU, peak memory, and the speedup of each log over the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PHASES = ("data_time_s", "visual_time_s", "llm_time_s", "optimizer_time_s")
COLUMNS = ("step_time_s", *PHASES, "samples_per_s", "tokens_per_s", "tflops_per_device", "mfu", "peak_memory_gib")


def steady_state(path: Path, skip: int) -> dict[str, float]:
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: {e}") from None
    steps = [l for l in lines if l.get("split") == "train" and "step_time_s" in l]
    steps = steps[skip:] if len(steps) > skip else steps
    if not steps:
        raise SystemExit(f"error: {path}: no training steps logged")
    return {
        "steps": len(steps),
        **{c: statistics.median(s[c] for s in steps) for c in COLUMNS if all(c in s for s in steps)},
    }


def label(path: Path) -> str:
    return path.parent.name if path.name == "metrics.jsonl" else path.stem


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the medians")
    parser.add_argument("--plot", type=Path, help="PNG path (default: throughput.png beside the first log)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rows = [(label(p), steady_state(p, args.skip)) for p in args.logs]
    print_table(rows)
    plot = args.plot or args.logs[0].parent / "throughput.png"
    plot_rows(rows, plot)
    print(f"wrote {plot}")
    return 0


def print_table(rows: list[tuple[str, dict]]) -> None:
    """The medians per log, with each log's speedup over the first."""
    base = rows[0][1]
    header = [
        "run",
        "steps",
        "step s",
        "data s",
        "visual s",
        "LLM s",
        "optim s",
        "samples/s",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "peak GiB",
        "speedup",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in rows:
        cells = [name, str(r["steps"])] + [f"{r[c]:.3f}" if c in r else "-" for c in ("step_time_s", *PHASES)]
        cells += [
            f"{r['samples_per_s']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['tflops_per_device']:.3f}" if "tflops_per_device" in r else "-",
            f"{r['mfu']:.1%}" if "mfu" in r else "-",
            f"{r['peak_memory_gib']:.2f}" if "peak_memory_gib" in r else "-",
            f"{base['step_time_s'] / r['step_time_s']:.2f}x",
        ]
        print("| " + " | ".join(cells) + " |")


def plot_rows(rows: list[tuple[str, dict]], plot: Path) -> None:
    """Stacked step phases and samples/s per log, the speedup over the first on its bar."""
    import matplotlib  # optional: data

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: data

    base = rows[0][1]
    fig, (phases_ax, rate_ax) = plt.subplots(1, 2, figsize=(10, 4))
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        values = [r.get(phase, 0.0) for _, r in rows]
        phases_ax.bar([n for n, _ in rows], values, bottom=bottom, label=phase.removesuffix("_time_s"))
        bottom = [b + v for b, v in zip(bottom, values)]
    phases_ax.set_ylabel("median step time (s)")
    phases_ax.legend()
    rate_ax.bar([n for n, _ in rows], [r["samples_per_s"] for _, r in rows], color="tab:green")
    rate_ax.set_ylabel("samples / s")
    for k, (_, r) in enumerate(rows):
        rate_ax.annotate(
            f"{base['step_time_s'] / r['step_time_s']:.2f}x", (k, r["samples_per_s"]), ha="center", va="bottom"
        )
    fig.tight_layout()
    fig.savefig(plot, dpi=100)
