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
(viq_megatron/preprocess.py does the work.)

Exit status: 0 all done; 3 done, some inputs skipped (see the report); 2 usage, input or
configuration error; 1 failed (e.g. a full disk; a rerun resumes). Errors are one line
naming the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from viq_megatron.config import ParallelConfig
from viq_megatron.data.text import open_text_tokenizer
from viq_megatron.preprocess import preprocess, read_inputs, remove_outputs
from viq_megatron.runtime.distributed import initialize, shutdown
from viq_megatron.runtime.errors import check_writable, one_line_errors
from viq_megatron.tokenizer import ViQTokenizer


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="LLaVA JSON/JSONL file or a folder of images")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a ViQTokenizer directory")
    parser.add_argument(
        "--text-tokenizer",
        required=True,
        type=Path,
        help="a Hugging Face tokenizer directory or a SentencePiece .model file",
    )
    parser.add_argument("--out", required=True, type=Path, help="output prefix (OUT.bin, OUT.idx)")
    parser.add_argument("--root", help="image paths resolve under this folder (default: the input's folder)")
    parser.add_argument("--allow-outside-root", action="store_true")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument(
        "--features",
        action="store_true",
        help="store the encoder's tokens (bf16) instead of codes: the cached-features baseline",
    )
    parser.add_argument("--overwrite", action="store_true", help="discard OUT's earlier output and shards first")
    return parser, parser.parse_args(argv)


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors, before the distributed runtime starts."""
    if not args.input.exists():
        parser.exit(2, f"error: {args.input}: no such file or directory\n")
    if args.shard_size < 1:
        parser.exit(2, f"error: --shard-size: {args.shard_size} must be >= 1\n")


def run(args: argparse.Namespace) -> int:
    """Loads the tokenizers and inputs and writes OUT; the exit status. Collective."""
    check_writable(args.out)  # before any image is encoded
    tok = ViQTokenizer.load(args.tokenizer)
    text_tok = open_text_tokenizer(args.text_tokenizer)
    items = read_inputs(args.input, args.root, args.allow_outside_root)
    if args.overwrite and dist.get_rank() == 0:  # the others wait for rank 0's manifest in preprocess
        remove_outputs(args.out)
    return preprocess(items, tok, text_tok, args.out, args.shard_size, args.features)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse(argv)
    validate(parser, args)
    initialize(ParallelConfig(), seed=0)
    with one_line_errors(parser):
        status = run(args)
    shutdown()
    return status
