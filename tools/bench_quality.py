"""Does the LLM read the image? Continuous features vs ViQ codes vs blind controls, on held-out scenes.

    torchrun --nproc-per-node 2 tools/bench_quality.py --config examples/bench_quality_tiny_cpu.yaml \\
        --stage1 runs/quickstart/stage1 --linf runs/quickstart/stage2_1 --tokenizer runs/quickstart/tokenizer \\
        --out runs/quickstart/bench_quality [key.sub=value ...]

Data: procedurally rendered scenes (viq_megatron/data/scenes.py) with short-answer questions
whose answers are read off the scene's parameters: background and object colours, shapes,
counts, relative positions, text in the image. The probe LLM trains on the train-split
scenes (`data.embedded.train_scenes`, every question of a scene in one conversation) and
answers one question at a time about held-out scenes (`data.embedded.val_scenes`), which no
stage of the pipeline ever trained on. Exact match after normalisation.

Rows, each with its accuracy per question kind:
- chance: a uniform guess among the answers each kind has in training;
- prior: always the most common training answer of the question's kind;
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
resumes: finished data, token files and runs are reused.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import viq_megatron  # noqa: E402,F401

SPLITS = ("real", "blank", "shuffled")  # held-out images as they are, blanked, shuffled across questions
BLANK = (128, 128, 128)


def write_data(cfg, folder: Path) -> dict[str, list[str]]:
    """The bench's conversation files (train.jsonl, val.jsonl, and per split SPLIT.jsonl with one
    question per sample) and their images; the question kinds of the held-out questions."""
    from PIL import Image

    from viq_megatron.data.scenes import render_scene, scene_split

    train_ids, val_ids = scene_split(cfg.data.embedded.train_scenes, cfg.data.embedded.val_scenes, cfg.seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{cfg.seed}-bench")
    conversations: dict[str, list[dict]] = {"train": [], "val": []}
    held_out = []  # (scene image, its size, its questions)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        for index in ids:
            scene = render_scene(index, cfg.seed)
            image = f"images/scene_{index}.png"
            scene.image.save(folder / image)
            questions = rng.sample(scene.questions, len(scene.questions))  # no fixed order to learn
            turns = [turn for q in questions for turn in ({"from": "human", "value": q.question},
                                                          {"from": "gpt", "value": q.answer})]
            turns[0] = {**turns[0], "value": f"<image>\n{turns[0]['value']}"}
            conversations[split].append({"id": index, "image": image, "conversations": turns})
            if split == "val":
                blank = f"images/blank_{index}.png"
                Image.new("RGB", scene.image.size, BLANK).save(folder / blank)
                held_out.append((image, blank, scene.questions))
    # Shuffled: every held-out scene's questions get another scene's image (a derangement).
    order = list(range(len(held_out)))
    rng.shuffle(order)
    other = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))} if len(order) > 1 else {0: 0}
    tests: dict[str, list[dict]] = {split: [] for split in SPLITS}
    kinds = []
    for k, (image, blank, questions) in enumerate(held_out):
        for j, q in enumerate(questions):
            kinds.append(q.kind)
            for split, shown in (("real", image), ("blank", blank), ("shuffled", held_out[other[k]][0])):
                tests[split].append({"id": f"{val_ids[k]}-{j}", "kind": q.kind, "image": shown, "conversations": [
                    {"from": "human", "value": f"<image>\n{q.question}"}, {"from": "gpt", "value": q.answer}]})
    for name, lines in {**conversations, **tests}.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = defaultdict(list)  # training answers per kind: the chance and prior rows
    for index in train_ids:
        for q in render_scene(index, cfg.seed).questions:
            answers[q.kind].append(q.answer)
    (folder / "train_answers.json").write_text(json.dumps(answers))
    (folder / "kinds.json").write_text(json.dumps(kinds))
    return answers


def baseline_scores(answers: dict[str, list[str]], kinds: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per held-out question: chance (1 / answers its kind has) and the kind's prior being right."""
    from viq_megatron.evaluate import normalize

    prior = {kind: Counter(values).most_common(1)[0][0] for kind, values in answers.items()}
    return {"chance": [1 / len(set(answers[k])) if k in answers else 0.0 for k in kinds],
            "prior": [float(k in prior and normalize(prior[k]) == normalize(r)) for k, r in zip(kinds, references)]}


def summary(scores: list[float], kinds: list[str]) -> dict:
    by_kind = defaultdict(list)
    for kind, score in zip(kinds, scores):
        by_kind[kind].append(score)
    return {"all": sum(scores) / len(scores), "by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()}}


def row_overrides(row: str, args, out: Path) -> list[str]:
    """What turns the bench config into one row's run."""
    common = [f"train.output_dir={out / 'runs' / row}", "model.projector=new",
              f"model.llm.tokenizer.sentencepiece_model={out / 'data' / 'tokenizer.model'}"]
    data = out / "data"
    images = [f"data.train={data / 'train.jsonl'}", f"data.val={data / 'val.jsonl'}"]
    if row == "continuous":
        return [*common, *images, "train.stage=continuous", f"train.init_from={args.stage1}",
                "train.freeze=[visual.encoder]"]
    if row == "linf":
        return [*common, *images, "train.stage=stage2", "model.head.quantizer=linf", f"train.init_from={args.linf}",
                "train.freeze=[visual.encoder, visual.head]", "train.distill_weight=0.0",
                "train.reconstruct_weight=0.0"]
    return [*common, "train.stage=discrete", f"model.viq_tokenizer={args.tokenizer}", "train.freeze=[visual.head]",
            f"data.train={out / 'tokens' / 'train'}", f"data.val={out / 'tokens' / 'val'}"]


def checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").glob("step_*") if p.is_dir() and not p.suffix)


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from tools.preprocess_images import preprocess
    from viq_megatron.config import load_config, parse_command_line
    from viq_megatron.data.conversations import read_conversations
    from viq_megatron.data.text import SentencePieceTokenizer
    from viq_megatron.evaluate import (answer_data_parallel, load_model, normalize, read_offline_questions,
                                       read_questions)
    from viq_megatron.runtime.distributed import initialize, is_main_process, setup_logging, shutdown
    from viq_megatron.tokenizer import ViQTokenizer
    from viq_megatron.training.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1", required=True, type=Path, help="a stage-1 run (the continuous features)")
    parser.add_argument("--linf", required=True, type=Path, help="a stage-2-1 run (linf quantizer)")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a ViQTokenizer directory (fsq codes)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rows", nargs="+", choices=("continuous", "linf", "discrete"),
                        default=["continuous", "linf", "discrete"])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args, cfg = parse_command_line(parser, argv)
    overrides = args.overrides
    env = initialize(cfg.parallel, cfg.seed)
    setup_logging(env.rank)
    out, timings = args.out, {}
    data = out / "data"

    start = time.perf_counter()
    if is_main_process() and not (data / "COMPLETE").is_file():
        answers = write_data(cfg, data)
        SentencePieceTokenizer.train((t["value"] for line in map(json.loads, (data / "train.jsonl").open())
                                      for t in line["conversations"]), cfg.model.llm.tokenizer.sentencepiece_vocab_size,
                                     data / "tokenizer")
        (data / "COMPLETE").write_text("")
    dist.barrier()
    answers = json.loads((data / "train_answers.json").read_text())
    kinds = json.loads((data / "kinds.json").read_text())
    text = SentencePieceTokenizer(data / "tokenizer.model")
    timings["data_s"] = time.perf_counter() - start

    if "discrete" in args.rows:  # images -> codes, once
        start = time.perf_counter()
        tok = ViQTokenizer.load(args.tokenizer)
        for name in ("train", "val", *SPLITS):
            prefix = out / "tokens" / name
            if not Path(f"{prefix}.idx").is_file():
                items = list(read_conversations(data / f"{name}.jsonl"))
                if preprocess(items, tok, text, prefix) != 0:
                    raise SystemExit(f"error: {prefix}: some samples could not be encoded (see its report)")
        timings["preprocess_s"] = time.perf_counter() - start
        del tok

    references = [json.loads(line)["conversations"][1]["value"] for line in (data / "real.jsonl").open()]
    results = {name: summary(values, kinds) for name, values in baseline_scores(answers, kinds, references).items()}
    for row in args.rows:
        row_cfg = load_config(args.config, [*overrides, *row_overrides(row, args, out)])
        start = time.perf_counter()
        Trainer(row_cfg).train()
        timings[f"{row}_train_s"] = time.perf_counter() - start
        start = time.perf_counter()
        offline = row == "discrete"
        questions = {split: read_offline_questions(out / "tokens" / split, text) if offline
                     else read_questions(data / f"{split}.jsonl") for split in SPLITS}
        run = out / "runs" / row
        entry = {"curve": []}
        steps = checkpoints(run)
        for step_dir in steps:
            model, visual_cfg = load_model(row_cfg, step_dir, online=not offline)
            final = step_dir == steps[-1]
            for split in SPLITS if final else ("real",):
                answered = answer_data_parallel(model, questions[split], text, visual_cfg, args.batch_size,
                                                args.max_new_tokens)
                if not is_main_process():
                    continue
                scores = [float(normalize(r["answer"]) == normalize(ref)) for r, ref in zip(answered, references)]
                if final:
                    entry[split] = summary(scores, kinds)
                    (out / f"answers_{row}_{split}.jsonl").write_text(
                        "".join(json.dumps({**r, "kind": k}) + "\n" for r, k in zip(answered, kinds)))
                if split == "real":
                    entry["curve"].append([int(step_dir.name.split("_")[1]), sum(scores) / len(scores)])
        if offline:  # the same model reading the held-out images through the tokenizer, online
            model, visual_cfg = load_model(row_cfg, steps[-1], online=True)
            online = answer_data_parallel(model, read_questions(data / "real.jsonl"), text, visual_cfg,
                                          args.batch_size, args.max_new_tokens)
            if is_main_process():
                offline_answers = [json.loads(line)["answer"] for line in (out / "answers_discrete_real.jsonl").open()]
                entry["online_equals_offline"] = [r["answer"] for r in online] == offline_answers
        timings[f"{row}_evaluate_s"] = time.perf_counter() - start
        if is_main_process():
            entry["throughput"] = str(run / "metrics.jsonl")
            results[row] = entry
    if is_main_process():
        report = {"questions": len(kinds), "held_out_scenes": cfg.data.embedded.val_scenes,
                  "train_scenes": cfg.data.embedded.train_scenes, "rows": results, "timings_s": timings}
        (out / "bench_quality.json").write_text(json.dumps(report, indent=2))
        table = markdown_table(results, kinds)
        (out / "bench_quality.md").write_text(table)
        print(table)
        plot_curves(results, out / "curves.png")
    shutdown()
    return 0


def markdown_table(results: dict, kinds: list[str]) -> str:
    from viq_megatron.data.scenes import QUESTION_KINDS

    order = [k for k in QUESTION_KINDS if k in kinds]
    counts = Counter(kinds)
    lines = ["| row | all | " + " | ".join(f"{k} ({counts[k]})" for k in order) + " |",
             "|---" * (len(order) + 2) + "|"]

    def line(name: str, entry: dict) -> str:
        return (f"| {name} | **{entry['all']:.3f}** | "
                + " | ".join(f"{entry['by_kind'].get(k, 0.0):.2f}" for k in order) + " |")

    for name in ("chance", "prior"):
        lines.append(line(name, results[name]))
    for row in ("continuous", "linf", "discrete"):
        if row in results:
            lines.append(line(row, results[row]["real"]))
            lines += [line(f"{row}, images {split}", results[row][split]) for split in SPLITS[1:]]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for row in ("continuous", "linf", "discrete"):
        if row in results and results[row]["curve"]:
            steps, accuracy = zip(*results[row]["curve"])
            axes.plot(steps, accuracy, marker="o", label=row)
    for name, style in (("prior", "--"), ("chance", ":")):
        axes.axhline(results[name]["all"], linestyle=style, color="grey", label=name)
    axes.set_xlabel("probe training step")
    axes.set_ylabel("held-out exact match")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
