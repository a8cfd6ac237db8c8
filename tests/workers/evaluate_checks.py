"""Evaluation checks under torchrun; writes results as JSON to argv[2]; the tests assert on them.

    train (1 process): the tiny model (stage `continuous`, everything trainable) learns the
        embedded scenes' question/answer pairs; viq_megatron.evaluate answers the seen scenes'
        questions and the held-out scenes' (batched and one at a time); tools/export_hf.py
        exports it and the Hugging Face adapter answers the held-out questions again
    parallel (2 processes): the held-out questions at TP=2, then at DP=2 through the command line
Answer files land in the work folder (argv[3]).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

import viq_megatron  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from conftest import TINY_TRAIN, tiny_train_config  # noqa: E402

TRAIN_SCENES, VAL_SCENES, SEED = 160, 16, 1234
STEPS, MAX_NEW_TOKENS = 300, 6
LLM = (
    "model.llm.arch={hidden_size: 128, num_layers: 2, num_attention_heads: 4, num_query_groups: 2, "
    "ffn_hidden_size: 256, vocab_size: 512, rotary_base: 10000.0}"
)


def write_questions(folder: Path, scenes: list[int], name: str, together: bool) -> Path:
    """The closed-form questions of each scene (reading a word is left out): all of a scene's
    in one conversation (`together`, for training: the image is paid for once), or one sample
    per question, laid out as a question file's "<image>\\nQ" -> A."""
    from viq_megatron.data.scenes import render_scene

    lines = []
    for index in scenes:
        pairs = [(q, a) for q, a in render_scene(index, SEED).qa if "written" not in q]
        for k, group in enumerate([pairs] if together else [[pair] for pair in pairs]):
            turns = []
            for question, answer in group:
                turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            turns[0]["value"] = f"<image>\n{turns[0]['value']}"
            lines.append({"id": f"{index}-{k}", "image": f"images/scene_{index}.png", "conversations": turns})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def settings(work: Path) -> list[str]:
    """The tiny training config's overrides for this run (its output_dir: work/run)."""
    data = work / "data"
    return [
        "train.stage=continuous",
        "train.freeze=[]",
        LLM,
        "data.seq_length=512",
        f"data.train={data / 'qa_train.jsonl'}",
        f"data.val={data / 'qa_val.jsonl'}",
        f"train.steps={STEPS}",
        f"train.save_every={STEPS}",
        "train.optimizer.warmup_steps=20",
        "train.optimizer.lr=0.003",
        "train.optimizer.min_lr=0.0003",
    ]


def config(work: Path, *extra: str):
    return tiny_train_config(work / "run", *settings(work), *extra)


def command_line(work: Path) -> list[str]:
    """The same config as key=value arguments."""
    return [*TINY_TRAIN, f"train.output_dir={work / 'run'}", *settings(work)]


def train(work: Path) -> dict:
    from viq_megatron.config import EmbeddedDataConfig
    from viq_megatron.data.embedded import write_embedded_dataset
    from viq_megatron.data.scenes import scene_split
    from viq_megatron.training.trainer import Trainer

    timings = {}
    start = time.perf_counter()
    write_embedded_dataset(work / "data", EmbeddedDataConfig(TRAIN_SCENES, VAL_SCENES), SEED)
    train_ids, val_ids = scene_split(TRAIN_SCENES, VAL_SCENES, SEED)
    write_questions(work / "data", train_ids, "qa_train", together=True)
    write_questions(work / "data", train_ids, "qa_train_questions", together=False)
    write_questions(work / "data", val_ids, "qa_val", together=False)
    timings["data_s"] = time.perf_counter() - start
    start = time.perf_counter()
    Trainer(config(work)).train()
    timings["train_s"] = time.perf_counter() - start
    answer(work, timings)
    return {"timings": timings, **hugging_face(work, timings)}


def answer(work: Path, timings: dict) -> None:
    """The seen scenes' questions, and the held-out ones batched and one at a time (files in work/)."""
    from viq_megatron import evaluate

    cfg, data = config(work), work / "data"
    for name, questions, batch in (
        ("answers_train", "qa_train_questions", 16),
        ("answers", "qa_val", 8),
        ("answers_single", "qa_val", 1),
    ):
        start = time.perf_counter()
        evaluate.run(
            cfg,
            work / "run",
            evaluate.read_questions(data / f"{questions}.jsonl"),
            work / f"{name}.jsonl",
            batch_size=batch,
            max_new_tokens=MAX_NEW_TOKENS,
        )
        timings[f"{name}_s"] = time.perf_counter() - start


def hugging_face(work: Path, timings: dict) -> dict:
    """tools/export_hf.py, then the adapter: its greedy answers, its logits after each prompt
    against ours, and its teacher-forced argmax over the tokens of our answers."""
    from dataclasses import replace

    from viq_megatron import evaluate, inference
    from viq_megatron.cli.export_hf import main as export
    from viq_megatron.data.multimodal import pack_samples
    from viq_megatron.data.text import stop_ids
    from viq_megatron.hf_adapter import ViQForHF

    start = time.perf_counter()
    assert export(["--checkpoint", str(work / "run"), "--out", str(work / "hf"), *command_line(work)]) == 0
    timings["export_s"] = time.perf_counter() - start
    start = time.perf_counter()
    hf = ViQForHF(work / "hf")
    cfg = config(work)
    model, _ = inference.load_model(cfg, work / "run")
    text = inference.load_text_tokenizer(cfg, work / "run")
    answers, logit_diff, forced = [], 0.0, []
    with torch.no_grad():
        for q in evaluate.read_questions(work / "data" / "qa_val.jsonl"):
            answers.append(hf.answer(q.question, q.sample.images, max_new_tokens=MAX_NEW_TOKENS))
            prompt = hf.layout(q.sample.turns, q.sample.images)  # the same layout evaluate uses
            ours = inference.next_token_logits(model, replace(pack_samples([prompt]), labels=None))[0]
            ids = inference.generate(model, [prompt], stop_ids(text), MAX_NEW_TOKENS, text.vocab_size)[0]
            embeds = torch.cat([hf.inputs_embeds(prompt), hf.lm.get_input_embeddings()(torch.tensor([ids]))], 1)
            logits = hf.lm(inputs_embeds=embeds).logits[0, len(prompt.token_ids) - 1 :].float()
            logit_diff = max(logit_diff, (logits[0] - ours).abs().max().item())
            logits[:, text.vocab_size :] = -float("inf")
            expected = ids + ([text.eos_id] if len(ids) < MAX_NEW_TOKENS else [])
            forced.append(logits.argmax(-1).tolist()[: len(expected)] == expected)
    timings["hf_s"] = time.perf_counter() - start
    return {"hf_answers": answers, "hf_logit_diff": logit_diff, "hf_teacher_forced": forced}


def parallel(work: Path) -> dict:
    """TP=2 through evaluate.run; DP=2 through the command line (which also shuts down)."""
    from viq_megatron import evaluate
    from viq_megatron.runtime.distributed import initialize

    timings = {}
    start = time.perf_counter()
    cfg = config(work, "parallel.tensor_model_parallel_size=2")
    initialize(cfg.parallel, cfg.seed)
    evaluate.run(
        cfg,
        work / "run",
        evaluate.read_questions(work / "data" / "qa_val.jsonl"),
        work / "answers_tp2.jsonl",
        batch_size=8,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    timings["tp2_s"] = time.perf_counter() - start
    start = time.perf_counter()
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(work / "run"),
                "--questions",
                str(work / "data" / "qa_val.jsonl"),
                "--out",
                str(work / "answers_dp2.jsonl"),
                "--batch-size",
                "8",
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
                *command_line(work),
            ]
        )
        == 0
    )
    timings["dp2_s"] = time.perf_counter() - start
    return {"timings": timings}


if __name__ == "__main__":
    mode, out, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    result = train(work) if mode == "train" else parallel(work)
    if int(os.environ.get("RANK", 0)) == 0:  # the command line shut torch.distributed down
        out.write_text(json.dumps(result))
