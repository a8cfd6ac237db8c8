"""The reading bench's data, rows and scoring (viq_megatron/cli/bench_quality.py runs them).

Held-out scenes with short-answer questions, asked as they are, with the image blanked and with
another scene's image (the blind controls); chance and answer-prior baselines from the training
answers; each trained row is the same probe LLM given a different visual input.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import torch
from PIL import Image

from viq_megatron.data.images import ImageError
from viq_megatron.data.scenes import COLOURS, QUESTION_KINDS, SHAPES, WORDS, Box, Scene, render_scene, scene_split
from viq_megatron.data.text import normalize

SPLITS = ("real", "blank", "shuffled")  # held-out images as they are, blanked, shuffled across questions
BLANK = (128, 128, 128)
ROWS = ("oracle", "continuous", "linf", "discrete")
# The oracle's token fields, one-hot blocks, then the box (x0, y0, x1, y1) and area as shares of
# the image's.
_ORACLE_FIELDS = (
    ("type", ("background", "object", "text", "digit", "blank")),
    ("colour", tuple(COLOURS)),
    ("shape", SHAPES),
    ("word", WORDS),
    ("digit", tuple("0123456789")),
)
ORACLE_WIDTH = sum(len(values) for _, values in _ORACLE_FIELDS) + 5  # 60


def _parameter_token(
    width: int, size: tuple[int, int], box: Box | None = None, tones: tuple[str, ...] = (), **fields: str
) -> torch.Tensor:
    """One oracle token: a one-hot block per named field (a two-tone background's second tone at
    0.5 in the colour block), then the box as shares of the image's `size`, zero padded."""
    out, offset = torch.zeros(width), 0
    for name, values in _ORACLE_FIELDS:
        if name in fields:
            out[offset + values.index(fields[name])] = 1.0
        if name == "colour":
            for tone, value in zip(tones, (1.0, 0.5)):
                out[offset + values.index(tone)] = value
        offset += len(values)
    if box is not None:
        (x0, y0, x1, y1), (w, h) = box, size
        out[offset : offset + 5] = torch.tensor([x0 / w, y0 / h, x1 / w, y1 / h, (x1 - x0) * (y1 - y0) / (w * h)])
    return out


def scene_parameter_tokens(scene: Scene, width: int = ORACLE_WIDTH) -> torch.Tensor:
    """A scene's exact parameters as [tokens, width]: one token for the background, one per
    object with its colour, shape and box, one for the text and one per digit of a number: what a
    perfect encoder could hand a reader."""
    size = scene.image.size

    def token(box: Box | None = None, tones: tuple[str, ...] = (), **fields: str) -> torch.Tensor:
        return _parameter_token(width, size, box, tones, **fields)

    tokens = [token(None, scene.background, type="background")]
    tokens += [token(o.bbox, type="object", colour=o.colour, shape=o.shape) for o in scene.objects]
    text = scene.text
    if text is not None:
        word = {"word": text.text} if text.kind == "word" else {}
        tokens.append(token(text.bbox, type="text", colour=text.colour, **word))
        if text.kind == "number":
            tokens += [token(type="digit", digit=d) for d in text.text]
    return torch.stack(tokens)


class SceneOracle:
    """The oracle row's visual input: each bench image's `scene_parameter_tokens`. Duck-types the
    tokenizer of tools/preprocess_images.py --features: the bench's files name the scene they
    show (images/scene_INDEX.png, images/blank_INDEX.png), rendered again from the run's seed.
    Tokens are zero-padded to `width` (the projector's input)."""

    def __init__(self, seed: int, width: int):
        if width < ORACLE_WIDTH:
            raise ValueError(f"the oracle's tokens need a width of at least {ORACLE_WIDTH}, got {width}")
        self.seed, self.width = seed, width

    def fingerprint(self) -> str:
        return f"scene oracle v1, seed {self.seed}, width {self.width}"

    def _tokens(self, image: str | Path) -> torch.Tensor:
        name = Path(image).name
        match = re.fullmatch(r"(scene|blank)_(\d+)\.png", name)
        if match is None:
            raise ImageError(f"{image}: not a bench image (the oracle reads scene_INDEX.png / blank_INDEX.png)")
        if match[1] == "blank":
            return _parameter_token(self.width, (1, 1), type="blank")[None]
        return scene_parameter_tokens(render_scene(int(match[2]), self.seed), self.width)

    def encoder_features(self, images) -> list[torch.Tensor]:
        """[1, tokens, width] per image: a one-row grid, as the encoder's [grid_h, grid_w, width]."""
        return [self._tokens(image)[None] for image in images]


def write_data(cfg, folder: Path) -> dict[str, list[str]]:
    """The bench's conversation files (train.jsonl, val.jsonl, and per split SPLIT.jsonl with one
    question per sample) and their images; the question kinds of the held-out questions."""
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
            # Each question a conversation of its own: a step then shows many scenes, not a few
            # scenes' every question (measured: the oracle row learns faster).
            for j, q in enumerate(scene.questions):
                turns = [{"from": "human", "value": f"<image>\n{q.question}"}, {"from": "gpt", "value": q.answer}]
                conversations[split].append({"id": f"{index}-{j}", "image": image, "conversations": turns})
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
                tests[split].append(
                    {
                        "id": f"{val_ids[k]}-{j}",
                        "kind": q.kind,
                        "image": shown,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{q.question}"},
                            {"from": "gpt", "value": q.answer},
                        ],
                    }
                )
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

    prior = {kind: Counter(values).most_common(1)[0][0] for kind, values in answers.items()}
    return {
        "chance": [1 / len(set(answers[k])) if k in answers else 0.0 for k in kinds],
        "prior": [float(k in prior and normalize(prior[k]) == normalize(r)) for k, r in zip(kinds, references)],
    }


def summary(scores: list[float], kinds: list[str]) -> dict:
    by_kind = defaultdict(list)
    for kind, score in zip(kinds, scores):
        by_kind[kind].append(score)
    return {"all": sum(scores) / len(scores), "by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()}}


def row_overrides(row: str, args, out: Path) -> list[str]:
    """What turns the bench config into one row's run (`args`: the runs it starts from)."""
    common = [
        f"train.output_dir={out / 'runs' / row}",
        "model.projector=new",
        f"model.llm.tokenizer.sentencepiece_model={out / 'data' / 'tokenizer.model'}",
    ]
    data = out / "data"
    images = [f"data.train={data / 'train.jsonl'}", f"data.val={data / 'val.jsonl'}"]
    if row == "oracle":
        return [
            *common,
            "train.stage=cached",
            f"model.viq_tokenizer={args.tokenizer}",
            "train.freeze=[]",
            f"data.train={out / 'oracle_tokens' / 'train'}",
            f"data.val={out / 'oracle_tokens' / 'val'}",
        ]
    if row == "continuous":
        return [
            *common,
            *images,
            "train.stage=continuous",
            f"train.init_from={args.stage1}",
            "train.freeze=[visual.encoder]",
        ]
    if row == "linf":
        return [
            *common,
            *images,
            "train.stage=stage2",
            "model.head.quantizer=linf",
            f"train.init_from={args.linf}",
            "train.freeze=[visual.encoder, visual.head]",
            "train.distill_weight=0.0",
            "train.reconstruct_weight=0.0",
        ]
    return [
        *common,
        "train.stage=discrete",
        f"model.viq_tokenizer={args.tokenizer}",
        "train.freeze=[visual.head]",
        f"data.train={out / 'tokens' / 'train'}",
        f"data.val={out / 'tokens' / 'val'}",
    ]


def checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").glob("step_*") if p.is_dir() and not p.suffix)


def markdown_table(results: dict, kinds: list[str]) -> str:
    order = [k for k in QUESTION_KINDS if k in kinds]
    counts = Counter(kinds)
    lines = ["| row | all | " + " | ".join(f"{k} ({counts[k]})" for k in order) + " |", "|---" * (len(order) + 2) + "|"]

    def line(name: str, entry: dict) -> str:
        return (
            f"| {name} | **{entry['all']:.3f}** | "
            + " | ".join(f"{entry['by_kind'].get(k, 0.0):.2f}" for k in order)
            + " |"
        )

    for name in ("chance", "prior"):
        lines.append(line(name, results[name]))
    for row in ROWS:
        if row in results:
            lines.append(line(row, results[row]["real"]))
            lines += [line(f"{row}, images {split}", results[row][split]) for split in SPLITS[1:]]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib  # optional: data

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: data

    figure, axes = plt.subplots(figsize=(6, 4))
    for row in ROWS:
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
