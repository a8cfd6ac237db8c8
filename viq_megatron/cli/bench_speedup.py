"""Discrete (offline ViQ codes) vs continuous (encoder every step) multimodal training, timed
by the `Trainer` itself.

    python tools/bench_speedup.py [--llm 0.5b 1.5b] [--seq-lengths 512 1024] [--steps 20]
                                  [--encoder frozen trained] [--no-cached] [--profile DIR] [--out DIR]

For each LLM and row length, one process builds one real `Trainer` per path (its DataLoader
workers, Megatron-Core DDP, optimizer and schedule, the loop a user runs), all on the same
packed rows, and the paths take turns step by step (so that a machine's drift reaches every
path alike), `--warmup` steps each and then `--steps` timed ones. Before each step the bench
collects garbage and pauses `--pause` seconds, untimed, so the previous path's workers finish
refilling their queue (on a GPU node they have cores of their own; on 2 CPU cores they would
slow the next path's step):
- continuous (encoder frozen, and trained): images decoded in the workers, encoder +
  projector + LLM; the strong baseline: its rows are built off the step;
- discrete: offline codes (tools/preprocess_images.py's token files, read by the same
  workers), the ViQ head's per-patch decoding + projector + LLM;
- cached (with the frozen encoder): the frozen encoder's tokens stored offline
  (preprocess_images.py --features, bf16) + projector + LLM: the fair rival of the codes, which
  also skips the encoder, at 2 * width bytes per patch against the codes' 16;
- ideal: the same rows with the visual embeddings given (no visual compute): the LLM step alone.
It prints each path's median step time and data wait, the achieved speedup (continuous /
discrete) beside the measured ideal (continuous / ideal) and the FLOP ideal (counted FLOPs of
the continuous step / the LLM step), and the bytes per patch each offline path stores (at the
bench's width, and at SO400M's).

Proportions: a SigLIP2-SO400M encoder with Qwen2.5-0.5B or 1.5B, 16x16 patches, one LLM
input per patch, 4 samples per row, images 3/4 of each. On CPU every width is divided by
--width-scale and the LLM's depth by --depth-scale; the vocabulary, the encoder's depth and
the head's post-blocks are chosen (`matched`) so that the LM head's share of the LLM's FLOPs
and the encoder's and code embedding's FLOPs per LLM FLOP are the real shapes' (attention's
share grows as widths shrink). Before timing anything the bench checks, on the packed rows
themselves, that images fill 3/4 of the rows (within 2 points), and that the encoder/LLM FLOP
ratio and the LM head's share are within 10% of the real shapes' on the same rows.
`--width-scale 1 --depth-scale 1` on a GPU runs the real sizes (bf16).
(viq_megatron/benchmarks/shapes.py and speedup.py hold the shapes, data, runs and timing.)
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
from pathlib import Path

import torch

from viq_megatron.benchmarks.shapes import LLMS, PATCH, SAMPLES_PER_ROW, bench_shapes, check_proportions
from viq_megatron.benchmarks.speedup import (
    WORDS,
    common_overrides,
    image_overrides,
    mode_result,
    path_runs,
    profile_paths,
    time_paths,
    write_data,
)
from viq_megatron.config import ParallelConfig, load_config
from viq_megatron.data.conversations import read_conversations
from viq_megatron.data.multimodal import PackedConversationDataset
from viq_megatron.data.text import SentencePieceTokenizer
from viq_megatron.data.token_dataset import visual_bytes
from viq_megatron.preprocess import preprocess
from viq_megatron.runtime.distributed import initialize, shutdown
from viq_megatron.tokenizer import ViQTokenizer
from viq_megatron.training.trainer import Trainer

TABLE = (
    "| LLM | seq | encoder | continuous s (data) | cached s (data) | discrete s (data) | ideal s (data) | "
    "speedup | measured ideal | FLOP ideal | discrete vs ideal | discrete vs cached |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", nargs="+", choices=sorted(LLMS), default=["0.5b", "1.5b"])
    parser.add_argument("--seq-lengths", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--encoder", nargs="+", choices=["frozen", "trained"], default=["frozen", "trained"])
    parser.add_argument("--width-scale", type=int, default=8)
    parser.add_argument("--depth-scale", type=int, default=4)
    parser.add_argument(
        "--cached",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the cached-features path too (with --encoder frozen)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between steps (untimed)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of every path")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler trace of 2 steps per path here")
    parser.add_argument("--out", type=Path, help="data, token files and runs (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    initialize(ParallelConfig(), seed=0)
    gc.disable()
    torch.set_flush_denormal(True)  # CPUs: tiny values must not change the arithmetic's speed
    cuda = torch.cuda.is_available()
    temporary = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(temporary.name if temporary else args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = SentencePieceTokenizer.train([" ".join(WORDS), "Describe the picture."] * 8, 400, out / "text" / "sp")
    print(
        f"{'bf16, cuda' if cuda else 'fp32, cpu'}; widths / {args.width_scale}, LLM depth / {args.depth_scale}; "
        f"{args.num_workers} DataLoader workers per path; median of {args.steps} steps per path"
    )
    print(TABLE)
    results = [
        result
        for name in args.llm
        for length in args.seq_lengths
        for result in bench_setting(args, name, length, out, text, cuda)
    ]
    (out / "bench_speedup.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'bench_speedup.json'}" if temporary is None else "")
    if temporary:
        temporary.cleanup()
    shutdown()
    return 0


def bench_setting(args: argparse.Namespace, name: str, length: int, out: Path, text, cuda: bool) -> list[dict]:
    """One LLM at one row length: data, proportions, offline files, then every path timed."""
    shape, real = bench_shapes(name, length, args.width_scale, args.depth_scale)
    folder = out / f"{name}_{length}"
    shutil.rmtree(folder, ignore_errors=True)  # a new random tokenizer each run: no stale codes
    data, pixels = write_data(folder, length, text, count=8 * SAMPLES_PER_ROW)
    common = common_overrides(shape, length, text, pixels, args.num_workers, cuda)
    cfg = load_config(None, [*common, *image_overrides(data), f"train.output_dir={folder / 'runs' / 'probe'}"])
    samples = list(read_conversations(data))
    packed = packed_rows(cfg, samples, text, length)
    proportions = check_proportions(shape, real, packed)  # before any timing
    print_proportions(name, length, proportions)
    tokenizer_dir = folder / "viq_tokenizer"
    ViQTokenizer(cfg, shape["arch"]["hidden_size"]).save(tokenizer_dir)
    offline = write_offline(args, tokenizer_dir, samples, text, folder)
    patches = sum(len(row.visual_positions) for row in packed)
    stored = {path: visual_bytes(prefix) / patches for path, prefix in offline.items()}
    print_stored(name, length, stored, real)
    times = time_setting(args, common, data, folder, tokenizer_dir, offline, f"{name}_{length}", cuda)
    return [report_mode(name, length, mode, times, proportions, stored) for mode in args.encoder]


def packed_rows(cfg, samples: list, text, length: int) -> list:
    """The rows every path reads, as the training data packs them."""
    rows = PackedConversationDataset(
        samples, tokenizer=text, rules=cfg.data.image, patch=PATCH, seq_length=length, teacher_side=None, seed=cfg.seed
    )
    return [rows[r] for r in range(rows.rows_per_epoch())]


def print_proportions(name: str, length: int, proportions: dict) -> None:
    print(
        f"| {name} | {length} | rows: images {proportions['visual_share']:.1%} of the tokens; per LLM FLOP "
        f"(real shapes in brackets): encoder {proportions['encoder_per_llm_bench']:.3f} "
        f"({proportions['encoder_per_llm_real']:.3f}), code embedding "
        f"{proportions['code_embedding_per_llm_bench']:.3f} ({proportions['code_embedding_per_llm_real']:.3f}), "
        f"LM head {proportions['lm_head_share_bench']:.1%} ({proportions['lm_head_share_real']:.1%}) "
        "|||||||||",
        flush=True,
    )


def write_offline(args: argparse.Namespace, tokenizer_dir: Path, samples: list, text, folder: Path) -> dict:
    """The discrete path's codes (and the cached path's features): path -> token file prefix."""
    offline = {"discrete": folder / "tokens"}
    if args.cached and "frozen" in args.encoder:
        offline["cached"] = folder / "features"
    tokenizer = ViQTokenizer.load(tokenizer_dir)
    for path, prefix in offline.items():
        if preprocess(samples, tokenizer, text, prefix, features=path == "cached"):
            raise SystemExit(f"error: {prefix}: some samples could not be encoded (see its report)")
    return offline


def print_stored(name: str, length: int, stored: dict, real: dict) -> None:
    print(
        f"| {name} | {length} | bytes per patch: codes {stored['discrete']:.0f}"
        + (
            f", features {stored['cached']:.0f} ({2 * real['encoder']['hidden_size']} at SO400M's width)"
            if "cached" in stored
            else ""
        )
        + " |||||||||",
        flush=True,
    )


def time_setting(
    args: argparse.Namespace,
    common: list[str],
    data: Path,
    folder: Path,
    tokenizer_dir: Path,
    offline: dict,
    stem: str,
    cuda: bool,
) -> dict:
    """One Trainer per path, timed in turns (and profiled with --profile); path -> step times."""
    runs = path_runs(common, data, tokenizer_dir, offline, args.encoder)
    trainers = {
        path: Trainer(
            load_config(None, [*overrides, f"train.output_dir={folder / 'runs' / path}"]), build_stage=builder
        )
        for path, (overrides, builder) in runs.items()
    }
    times = time_paths(trainers, args.warmup, args.steps, args.pause)
    if args.profile:
        profile_paths(trainers, args.profile, stem, cuda)
    for trainer in trainers.values():
        trainer.close()
    return times


def report_mode(name: str, length: int, mode: str, times: dict, proportions: dict, stored: dict) -> dict:
    """The table row of the continuous path with the encoder `mode`; its result."""
    result = mode_result(name, length, mode, times, proportions, stored)
    cached = "cached_s" in result
    continuous_s, discrete_s, ideal_s = result["continuous_s"], result["discrete_s"], result["ideal_s"]
    print(
        f"| {name} | {length} | {mode} | {continuous_s:.3f} ({result['continuous_data_s']:.3f}) | "
        + (f"{result['cached_s']:.3f} ({result['cached_data_s']:.3f})" if cached else "-")
        + f" | {discrete_s:.3f} ({result['discrete_data_s']:.3f}) | {ideal_s:.3f} ({result['ideal_data_s']:.3f}) | "
        f"{result['speedup']:.2f}x | {result['measured_ideal']:.2f}x | {result['flop_ideal']:.2f}x | "
        f"{discrete_s / ideal_s - 1:+.1%} | "
        + (f"{discrete_s / result['cached_s'] - 1:+.1%}" if cached else "-")
        + " |",
        flush=True,
    )
    return result
