"""Does the model read the image? Checks under torchrun (2 processes, data parallel); writes JSON
to argv[2], work folder argv[3]; tests/test_reading.py asserts on it.

colours: images whose only content is a colour, questions whose answer is that colour. The
    tiny model trains through the real Trainer (continuous: encoder + projector + LLM; discrete:
    offline ViQ codes of a tokenizer), then answers held-out images as they are, blanked and
    shuffled across questions; the discrete model answers once from offline codes, once online.
bench: tools/bench_quality.py end to end at toy size (its continuous and discrete rows).
"""

import json
import random
import sys
from pathlib import Path

import torch

import viq_megatron  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from conftest import TINY_TRAIN, tiny_train_config  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 70, 220), "yellow": (250, 220, 30)}
HEAD = "model.head={subtoken_size: 32, pre_layers: 1, subtoken_layers: 1, subtoken_ffn_size: 64, post_blocks: 1}"
STEPS = 100


def write_colour_data(folder: Path) -> None:
    """train.jsonl (160 images), and three question files on 24 other images: real.jsonl, blank.jsonl
    (each image grey), shuffled.jsonl (each question shown another image of another colour)."""
    from PIL import Image

    rng = random.Random(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)

    def sample(name: str, colour: str, image: str) -> dict:
        return {
            "id": name,
            "image": image,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the picture?"},
                {"from": "gpt", "value": colour},
            ],
        }

    def image(name: str, rgb, size) -> str:
        Image.new("RGB", size, rgb).save(folder / "images" / f"{name}.png")
        return f"images/{name}.png"

    lines = {"train": [], "real": [], "blank": [], "shuffled": []}
    held_out = []
    for k in range(184):
        colour = rng.choice(sorted(COLOURS))
        size = (rng.choice([32, 48, 64, 80]), rng.choice([32, 48, 64]))
        if k < 160:
            lines["train"].append(sample(f"t{k}", colour, image(f"t{k}", COLOURS[colour], size)))
        else:
            held_out.append(
                (f"v{k}", colour, image(f"v{k}", COLOURS[colour], size), image(f"blank{k}", (128, 128, 128), size))
            )
    for k, (name, colour, real, blank) in enumerate(held_out):
        other = next(h for h in held_out[k + 1 :] + held_out[:k] if h[1] != colour)
        lines["real"].append(sample(name, colour, real))
        lines["blank"].append(sample(name, colour, blank))
        lines["shuffled"].append(sample(name, colour, other[2]))
    for name, samples in lines.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def accuracy(results: list[dict]) -> float:
    from viq_megatron.evaluate import normalize

    return sum(normalize(r["answer"]) == normalize(r["reference"]) for r in results) / len(results)


def colours(work: Path) -> dict:
    import torch.distributed as dist

    from viq_megatron.data.conversations import read_conversations
    from viq_megatron.data.text import SentencePieceTokenizer
    from viq_megatron.evaluate import read_offline_questions, read_questions, run
    from viq_megatron.preprocess import preprocess
    from viq_megatron.runtime.distributed import initialize
    from viq_megatron.tokenizer import ViQTokenizer
    from viq_megatron.training.trainer import Trainer

    data = work / "data"
    settings = [
        f"data.train={data / 'train.jsonl'}",
        f"data.val={data / 'real.jsonl'}",
        f"train.steps={STEPS}",
        f"train.save_every={STEPS}",
        "train.optimizer.lr=0.003",
        "train.optimizer.warmup_steps=10",
        f"model.llm.tokenizer.sentencepiece_model={data / 'sp.model'}",
    ]
    cfg = tiny_train_config(work / "continuous", *settings, "train.stage=continuous", "train.freeze=[visual.encoder]")
    initialize(cfg.parallel, cfg.seed)
    if dist.get_rank() == 0:
        write_colour_data(data)
        SentencePieceTokenizer.train(["What colour is the picture?", *COLOURS] * 3, 300, data / "sp")
        torch.manual_seed(0)
        ViQTokenizer(tiny_train_config(work / "x", HEAD), 64).save(data / "tok")  # untrained: its codes still differ
    dist.barrier()
    text = SentencePieceTokenizer(data / "sp.model")
    result = {}

    trainer = Trainer(cfg)
    encoder_before = {n: p.detach().clone() for n, p in trainer.model[0].module.visual.encoder.named_parameters()}
    projector_before = {n: p.detach().clone() for n, p in trainer.model[0].module.visual.projector.named_parameters()}
    trainer.train()
    module = trainer.model[0].module
    result["frozen_encoder_unchanged"] = all(
        torch.equal(p, encoder_before[n]) for n, p in module.visual.encoder.named_parameters()
    )
    result["projector_trained"] = all(
        not torch.equal(p, projector_before[n]) for n, p in module.visual.projector.named_parameters()
    )
    for split in ("real", "blank", "shuffled"):
        answers = run(
            cfg,
            work / "continuous",
            read_questions(data / f"{split}.jsonl"),
            work / f"continuous_{split}.jsonl",
            batch_size=8,
            max_new_tokens=8,
        )
        result[f"continuous_{split}"] = accuracy(answers) if answers else None

    tok = ViQTokenizer.load(data / "tok")
    for name in ("train", "real", "blank", "shuffled"):
        preprocess(list(read_conversations(data / f"{name}.jsonl")), tok, text, work / "tokens" / name)
    # Codes of an untrained head separate the colours less cleanly than encoder features: more steps.
    discrete = tiny_train_config(
        work / "discrete",
        *settings,
        f"train.steps={3 * STEPS}",
        f"train.save_every={3 * STEPS}",
        HEAD,
        "train.stage=discrete",
        "train.freeze=[visual.head]",
        f"model.viq_tokenizer={data / 'tok'}",
        f"data.train={work / 'tokens/train'}",
        f"data.val={work / 'tokens/real'}",
    )
    Trainer(discrete).train()
    for split in ("real", "blank", "shuffled"):
        answers = run(
            discrete,
            work / "discrete",
            read_offline_questions(work / "tokens" / split, text),
            work / f"discrete_{split}.jsonl",
            batch_size=8,
            max_new_tokens=8,
        )
        result[f"discrete_{split}"] = accuracy(answers) if answers else None
    online = run(
        discrete,
        work / "discrete",
        read_questions(data / "real.jsonl"),
        work / "discrete_online.jsonl",
        batch_size=8,
        max_new_tokens=8,
    )
    if online:
        offline = [json.loads(line) for line in (work / "discrete_real.jsonl").read_text().splitlines()]
        result["online_answers"] = [r["answer"] for r in online]
        result["offline_answers"] = [r["answer"] for r in offline]
    return result


def bench(work: Path) -> dict:
    """The bench at toy size, on the colour runs above as its stage-1 run and tokenizer."""
    from viq_megatron.cli.bench_quality import main

    overrides = [
        *TINY_TRAIN,
        HEAD,
        "model.head.quantizer=fsq",
        "data.embedded.train_scenes=12",
        "data.embedded.val_scenes=3",
        "data.image.max_pixels=4096",
        "data.seq_length=512",
        "train.steps=4",
        "train.save_every=2",
        "train.eval_every=0",
    ]
    main(
        [
            "--config",
            str(Path(__file__).resolve().parents[2] / "examples/bench_quality_tiny_cpu.yaml"),
            "--stage1",
            str(work / "continuous"),
            "--linf",
            str(work / "continuous"),
            "--tokenizer",
            str(work / "data" / "tok"),
            "--rows",
            "oracle",
            "continuous",
            "discrete",
            "--out",
            str(work / "bench"),
            *overrides,
        ]
    )
    return {}


if __name__ == "__main__":
    out, work = Path(sys.argv[2]), Path(sys.argv[3])
    result = colours(work)
    result.update(bench(work))
    if int(__import__("os").environ.get("RANK", 0)) == 0:
        out.write_text(json.dumps(result))
