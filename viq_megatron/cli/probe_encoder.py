"""What a ViQ tokenizer's representations know about a scene, measured by a probe.

    python tools/probe_encoder.py --encoder pretrained/tiny_scene_encoder --tokenizer runs/quickstart/tokenizer \\
        --linf runs/quickstart/stage2_1 --out runs/quickstart/encoder_probe \\
        [--train-scenes 1000] [--held-out 300] [--steps 1500]

A probe per kind (background, count, and the colour, shape and position of the largest object;
viq_megatron/benchmarks/encoder_probe.py) learns from frozen tokens of rendered training scenes
and answers for held-out ones. Rows: the answer prior; each scene's exact parameters as tokens
(the bench's oracle: the probe's own ceiling); raw pixels (16x16 patches at 128x128: a
reference); the tokens of each --encoder directory (a starting encoder: the shipped one, or a
converted SigLIP2), read under the tokenizer's image rules (else --max-pixels); the tokenizer's
encoder tokens (the stage-1 encoder, frozen since); with --linf, the features the stage-2-1
head (L-inf) feeds the projector; the LLM inputs the tokenizer's codes give
(`ViQTokenizer.embed`). Writes probe.json and probe.md into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from viq_megatron.benchmarks.encoder_probe import (
    KINDS,
    encoder_features,
    head_features,
    majority_rates,
    of_images,
    pixel_features,
    probe_set,
    scene_parameter_features,
    score_probe,
    train_probe,
)
from viq_megatron.config import ImageConfig, ParallelConfig
from viq_megatron.runtime.distributed import initialize, shutdown
from viq_megatron.runtime.errors import check_writable
from viq_megatron.tokenizer import ViQTokenizer


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", type=Path, action="append", default=[], help="an encoder directory")
    parser.add_argument("--tokenizer", type=Path, help="a ViQTokenizer directory")
    parser.add_argument("--linf", type=Path, help="the stage-2-1 run the tokenizer grew from (needs --tokenizer)")
    parser.add_argument("--max-pixels", type=int, default=16384, help="--encoder's image budget, without --tokenizer")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--train-scenes", type=int, default=1000)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    if min(args.train_scenes, args.held_out, args.steps) < 1:
        parser.exit(2, "error: --train-scenes, --held-out and --steps must be >= 1\n")
    if not args.encoder and args.tokenizer is None:
        parser.exit(2, "error: nothing to probe: give --encoder and/or --tokenizer\n")
    if args.linf is not None and args.tokenizer is None:
        parser.exit(2, "error: --linf reads the run with the tokenizer's sizes: give --tokenizer too\n")
    return args


def table(rows: dict[str, dict[str, float]]) -> str:
    kinds = [*KINDS, "all"]
    lines = [f"| row | {' | '.join(kinds)} |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {name} | " + " | ".join(f"{scores[k]:.3f}" for k in kinds) + " |" for name, scores in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    check_writable(args.out / "probe.json")
    tokenizer = ViQTokenizer.load(args.tokenizer) if args.tokenizer else None
    rules = tokenizer.cfg.data.image if tokenizer else ImageConfig(min_pixels=4096, max_pixels=args.max_pixels)
    sources = {"scene parameters": scene_parameter_features, "pixels": of_images(pixel_features())}
    for directory in args.encoder:
        sources[f"{directory.name} tokens"] = of_images(encoder_features(directory, rules))
    if tokenizer is not None:
        sources["encoder tokens"] = of_images(
            lambda images: [t.reshape(-1, t.shape[-1]) for t in tokenizer.encoder_features(images)]
        )
        if args.linf is not None:  # its checkpoint is read through Megatron's runtime
            initialize(ParallelConfig(), seed=0)
            sources["2-1 features"] = of_images(head_features(args.tokenizer, args.linf, "linf"))
        sources["code embeddings"] = of_images(
            lambda images: tokenizer.embed([e.codes for e in tokenizer.encode(images)])
        )
    rows = {}
    for name, features in sources.items():
        train = probe_set(features, args.train_scenes, held_out=False)
        held_out = probe_set(features, args.held_out, held_out=True)
        rows.setdefault("prior", majority_rates(train, held_out))
        rows[name] = score_probe(train_probe(train, args.steps), held_out)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **rows}))
    (args.out / "probe.md").write_text(table(rows))
    print(table(rows), end="")
    if args.linf is not None:
        shutdown()
    return 0
