"""Does the LLM read the image? Continuous features vs ViQ codes vs blind controls, on held-out scenes.

    torchrun --nproc-per-node 2 tools/bench_quality.py --config examples/bench_quality_tiny_cpu.yaml \\
        --stage1 runs/quickstart/stage1 --linf runs/quickstart/stage2_1 --tokenizer runs/quickstart/tokenizer \\
        --out runs/quickstart/bench_quality [key.sub=value ...]

Data: procedurally rendered scenes (viq_megatron/data/scenes.py) with short-answer questions
whose answers are read off the scene's parameters: background and object colours, shapes,
counts, relative positions, text in the image. The probe LLM trains on the train-split
scenes (`data.embedded.train_scenes`, each question with its image as a conversation) and
answers one question at a time about held-out scenes (`data.embedded.val_scenes`), which no
stage of the pipeline ever trained on. Exact match after normalisation.

Rows, each with its accuracy per question kind:
- chance: a uniform guess among the answers each kind has in training;
- prior: always the most common training answer of the question's kind;
- oracle: each scene's exact parameters as visual tokens (benchmarks/quality.py SceneOracle:
  the background, every object's colour, shape and box, the text), stored offline like cached
  features: what the probe LLM reaches when the visual input holds everything. The ceiling;
- continuous: the stage-1 encoder's features (`--stage1`, frozen) through a new projector;
- linf: the stage-2-1 head's L-inf features (`--linf`, encoder and head frozen);
- discrete: the ViQ tokenizer's 16k FSQ codes (`--tokenizer`), written to offline token files
  once by tools/preprocess_images.py and read through its code embedder (head frozen);
- each trained row again with the held-out images blanked (a grey image of the same size) and
  with them shuffled across questions: the blind controls.
Every trained row is the same probe LLM (the config's `model.llm.arch`, the same
initialisation, SentencePiece tokenizer, steps, optimizer and packed rows in the same order)
trained by the same `Trainer`; only the visual input differs. Checkpoints every
`train.save_every` steps are scored too (the accuracy curve). The discrete model also answers
the held-out questions online (images through the tokenizer's encoder and head): its answers
must equal the offline ones.

Writes OUT/bench_quality.json, OUT/bench_quality.md (the table), OUT/curves.png, the answer
files, and each row's run (OUT/runs/ROW: checkpoints, metrics.jsonl with throughput). A rerun
resumes: finished data, token files and runs are reused. (viq_megatron/benchmarks/quality.py
holds the data, rows and scoring.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch.distributed as dist

from viq_megatron.benchmarks.quality import (
    ROWS,
    SPLITS,
    SceneOracle,
    baseline_scores,
    checkpoints,
    markdown_table,
    plot_curves,
    row_overrides,
    summary,
    write_data,
)
from viq_megatron.config import load_config, parse_command_line
from viq_megatron.data.conversations import read_conversations
from viq_megatron.data.text import SentencePieceTokenizer
from viq_megatron.evaluate import answer_data_parallel, normalize, read_offline_questions, read_questions
from viq_megatron.inference import load_model
from viq_megatron.models.files import read_tokenizer_config
from viq_megatron.preprocess import preprocess
from viq_megatron.runtime.distributed import initialize, is_main_process, setup_logging, shutdown
from viq_megatron.tokenizer import ViQTokenizer
from viq_megatron.training.trainer import Trainer


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, object]:
    """(the arguments, the bench config with its key=value overrides)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1", required=True, type=Path, help="a stage-1 run (the continuous features)")
    parser.add_argument("--linf", required=True, type=Path, help="a stage-2-1 run (linf quantizer)")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a ViQTokenizer directory (fsq codes)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    return parse_command_line(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(argv)
    env = initialize(cfg.parallel, cfg.seed)
    setup_logging(env.rank)
    timings = {}
    answers, kinds, text = prepare_data(cfg, args.out / "data", timings)
    if "discrete" in args.rows:
        write_codes(args, text, timings)
    if "oracle" in args.rows:
        write_oracle_tokens(cfg, args, text, timings)
    references = [json.loads(line)["conversations"][1]["value"] for line in (args.out / "data/real.jsonl").open()]
    results = {name: summary(values, kinds) for name, values in baseline_scores(answers, kinds, references).items()}
    for row in args.rows:
        entry = run_row(row, args, text, kinds, references, timings)
        if is_main_process():
            results[row] = entry
    if is_main_process():
        report(cfg, args.out, results, kinds, timings)
    shutdown()
    return 0


def prepare_data(cfg, data: Path, timings: dict) -> tuple[dict, list[str], object]:
    """The scenes' files and the probe's SentencePiece tokenizer, written once by rank 0 (a rerun
    reuses them); (training answers per kind, held-out question kinds, the text tokenizer)."""
    start = time.perf_counter()
    if is_main_process() and not (data / "COMPLETE").is_file():
        write_data(cfg, data)
        SentencePieceTokenizer.train(
            (t["value"] for line in map(json.loads, (data / "train.jsonl").open()) for t in line["conversations"]),
            cfg.model.llm.tokenizer.sentencepiece_vocab_size,
            data / "tokenizer",
        )
        (data / "COMPLETE").write_text("")
    dist.barrier()
    answers = json.loads((data / "train_answers.json").read_text())
    kinds = json.loads((data / "kinds.json").read_text())
    text = SentencePieceTokenizer(data / "tokenizer.model")
    timings["data_s"] = time.perf_counter() - start
    return answers, kinds, text


def write_codes(args: argparse.Namespace, text, timings: dict) -> None:
    """Every split's images -> codes in offline token files, once (finished files are reused)."""
    start = time.perf_counter()
    tok = ViQTokenizer.load(args.tokenizer)
    for name in ("train", "val", *SPLITS):
        prefix = args.out / "tokens" / name
        if not Path(f"{prefix}.idx").is_file():
            items = list(read_conversations(args.out / "data" / f"{name}.jsonl"))
            if preprocess(items, tok, text, prefix) != 0:
                raise SystemExit(f"error: {prefix}: some samples could not be encoded (see its report)")
    timings["preprocess_s"] = time.perf_counter() - start


def write_oracle_tokens(cfg, args: argparse.Namespace, text, timings: dict) -> None:
    """Every split's scene parameters as the oracle's stored visual tokens, once."""
    start = time.perf_counter()
    oracle = SceneOracle(cfg.seed, oracle_width(args))
    for name in ("train", "val", *SPLITS):
        prefix = args.out / "oracle_tokens" / name
        if not Path(f"{prefix}.idx").is_file():
            items = list(read_conversations(args.out / "data" / f"{name}.jsonl"))
            if preprocess(items, oracle, text, prefix, features=True) != 0:
                raise SystemExit(f"error: {prefix}: some samples could not be written (see its report)")
    timings["oracle_tokens_s"] = time.perf_counter() - start


def oracle_width(args: argparse.Namespace) -> int:
    """The oracle's token width: the input width of the tokenizer's projector, which it trains anew."""
    return read_tokenizer_config(args.tokenizer)[0].model.encoder.hidden_size


def run_row(row: str, args: argparse.Namespace, text, kinds: list[str], references: list[str], timings: dict) -> dict:
    """Trains one row's probe, then scores its checkpoints; its entry (complete on rank 0)."""
    row_cfg = load_config(args.config, [*args.overrides, *row_overrides(row, args, args.out)])
    start = time.perf_counter()
    Trainer(row_cfg).train()
    timings[f"{row}_train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    entry = score_checkpoints(row, row_cfg, args, text, kinds, references)
    if row == "discrete":
        same = online_equals_offline(row_cfg, args, text)
        if is_main_process():
            entry["online_equals_offline"] = same
    timings[f"{row}_evaluate_s"] = time.perf_counter() - start
    entry["throughput"] = str(args.out / "runs" / row / "metrics.jsonl")
    return entry


def score_checkpoints(
    row: str, row_cfg, args: argparse.Namespace, text, kinds: list[str], references: list[str]
) -> dict:
    """Each checkpoint's held-out accuracy (the curve); the last one's per split, with its
    answer files (OUT/answers_ROW_SPLIT.jsonl)."""
    offline = row in ("discrete", "oracle")  # questions from stored codes or oracle tokens

    def read(split: str) -> list:
        if row == "discrete":
            return read_offline_questions(args.out / "tokens" / split, text)
        if row == "oracle":
            return read_offline_questions(args.out / "oracle_tokens" / split, text, oracle_width(args))
        return read_questions(args.out / "data" / f"{split}.jsonl")

    questions = {split: read(split) for split in SPLITS}
    entry = {"curve": []}
    steps = checkpoints(args.out / "runs" / row)
    for step_dir in steps:
        model, visual_cfg = load_model(row_cfg, step_dir, online=not offline)
        final = step_dir == steps[-1]
        for split in SPLITS if final else ("real",):
            answered = answer_data_parallel(
                model, questions[split], text, visual_cfg, args.batch_size, args.max_new_tokens
            )
            if not is_main_process():
                continue
            scores = [float(normalize(r["answer"]) == normalize(ref)) for r, ref in zip(answered, references)]
            if final:
                entry[split] = summary(scores, kinds)
                (args.out / f"answers_{row}_{split}.jsonl").write_text(
                    "".join(json.dumps({**r, "kind": k}) + "\n" for r, k in zip(answered, kinds))
                )
            if split == "real":
                entry["curve"].append([int(step_dir.name.split("_")[1]), sum(scores) / len(scores)])
    return entry


def online_equals_offline(row_cfg, args: argparse.Namespace, text) -> bool | None:
    """Whether the discrete model, reading the held-out images through the tokenizer online,
    answers as it did from the offline codes (None off rank 0). Collective."""
    model, visual_cfg = load_model(row_cfg, checkpoints(args.out / "runs" / "discrete")[-1], online=True)
    online = answer_data_parallel(
        model, read_questions(args.out / "data" / "real.jsonl"), text, visual_cfg, args.batch_size, args.max_new_tokens
    )
    if not is_main_process():
        return None
    offline = [json.loads(line)["answer"] for line in (args.out / "answers_discrete_real.jsonl").open()]
    return [r["answer"] for r in online] == offline


def report(cfg, out: Path, results: dict, kinds: list[str], timings: dict) -> None:
    """OUT/bench_quality.json, the table (printed and OUT/bench_quality.md), OUT/curves.png."""
    numbers = {
        "questions": len(kinds),
        "held_out_scenes": cfg.data.embedded.val_scenes,
        "train_scenes": cfg.data.embedded.train_scenes,
        "rows": results,
        "timings_s": timings,
    }
    (out / "bench_quality.json").write_text(json.dumps(numbers, indent=2))
    table = markdown_table(results, kinds)
    (out / "bench_quality.md").write_text(table)
    print(table)
    plot_curves(results, out / "curves.png")
