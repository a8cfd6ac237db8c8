"""The speed bench's data, runs and timing (viq_megatron/cli/bench_speedup.py prints them).

Every path is a real `Trainer` on the same packed rows; the paths take turns step by step, so
that a machine's drift reaches every path alike.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import torch
from megatron.core.transformer.module import MegatronModule
from PIL import Image

from viq_megatron.benchmarks.shapes import PATCH, SAMPLES_PER_ROW, VISUAL_SHARE, flop_ideal, grid
from viq_megatron.data.embedded import shipped_photos
from viq_megatron.data.text import Turn, tokenize_conversation
from viq_megatron.models.multimodal import VisualOutput
from viq_megatron.models.provider import device, params_dtype
from viq_megatron.training.stages.discrete import Discrete

WORDS = (
    "red green blue yellow circle square triangle left right top bottom small large one two three "
    "the a of in on is with and near far above below beside scene picture shows there"
).split()


def write_data(folder: Path, length: int, text_tokenizer, count: int) -> tuple[Path, int]:
    """`count` conversations of one image each, laid out so that `SAMPLES_PER_ROW` fill a row
    of `length` tokens with images taking `VISUAL_SHARE` of it; (their JSONL, pixels per image)."""
    per_sample = length // SAMPLES_PER_ROW
    rows, columns = grid(round(per_sample * VISUAL_SHARE))
    text_budget = per_sample - rows * columns
    photos = shipped_photos()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(count):
        image = f"images/{k}.jpg"
        photo = Image.open(photos[k % len(photos)]).convert("RGB")
        photo.resize((columns * PATCH, rows * PATCH)).save(folder / image, quality=90)
        words = [WORDS[(k * 7 + i) % len(WORDS)] for i in range(text_budget)]
        while True:  # the longest answer that fits the sample's text budget
            turns = [Turn("user", "<image>\nDescribe the picture."), Turn("assistant", " ".join(words))]
            if tokenize_conversation(text_tokenizer, turns).num_text_tokens() <= text_budget:
                break
            if not words:
                raise SystemExit(
                    f"error: --seq-lengths {length}: samples of {per_sample} tokens leave {text_budget} "
                    "for text, fewer than the conversation needs without an answer"
                )
            words.pop()
        lines.append(
            {
                "id": k,
                "image": image,
                "conversations": [{"from": "human", "value": turns[0].text}, {"from": "gpt", "value": turns[1].text}],
            }
        )
    path = folder / f"data_{length}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, rows * columns * PATCH * PATCH


def common_overrides(shape: dict[str, dict], length: int, text, pixels: int, num_workers: int, cuda: bool) -> list[str]:
    """The config every path shares: the shapes, the SentencePiece tokenizer `text`, the rows."""
    return [
        *(f"model.{part}.{k}={v}" for part in ("encoder", "head") for k, v in shape[part].items()),
        *(f"model.llm.arch.{k}={v}" for k, v in shape["arch"].items()),
        f"model.llm.arch.max_sequence_length={length}",
        "model.llm.tokenizer.kind=sentencepiece",
        f"model.llm.tokenizer.sentencepiece_model={text.model_file}",
        f"model.llm.tokenizer.sentencepiece_vocab_size={text.vocab_size}",
        f"model.params_dtype={'bfloat16' if cuda else 'float32'}",
        f"data.seq_length={length}",
        f"data.image.min_pixels={pixels}",
        f"data.image.max_pixels={pixels}",
        f"data.num_workers={num_workers}",
        "train.steps=100000",
        "train.eval_every=0",
        "train.save_every=0",
        "train.optimizer.warmup_steps=0",
        "train.optimizer.lr=1.0e-5",
        "train.optimizer.min_lr=1.0e-5",
    ]


def image_overrides(data: Path) -> list[str]:
    """The continuous paths' data: the images, decoded in the DataLoader workers."""
    return [f"data.train={data}", f"data.val={data}", "train.stage=continuous"]


def path_runs(
    common: list[str], data: Path, tokenizer_dir: Path, offline: dict[str, Path], encoders: list[str]
) -> dict[str, tuple[list[str], object]]:
    """path -> (its config overrides, the stage builder or None): continuous per encoder mode,
    cached (where `offline` holds features), discrete, and ideal (discrete with given embeddings)."""
    discrete = [
        "train.stage=discrete",
        f"model.viq_tokenizer={tokenizer_dir}",
        "train.freeze=[visual.head]",
        f"data.train={offline['discrete']}",
        f"data.val={offline['discrete']}",
    ]
    runs = {}
    for mode in encoders:
        freeze = "[visual.encoder]" if mode == "frozen" else "[]"
        runs[f"continuous_{mode}"] = ([*common, *image_overrides(data), f"train.freeze={freeze}"], None)
    if "cached" in offline:
        runs["cached"] = (
            [
                *common,
                "train.stage=cached",
                f"model.viq_tokenizer={tokenizer_dir}",
                "train.freeze=[]",
                f"data.train={offline['cached']}",
                f"data.val={offline['cached']}",
            ],
            None,
        )
    runs["discrete"] = ([*common, *discrete], None)
    runs["ideal"] = ([*common, *discrete], IdealStage)
    return runs


class GivenEmbeddings(MegatronModule):
    """Precomputed visual embeddings of the scale an LLM's own have (zeros would drive CPU
    arithmetic into denormals): the visual input of the LLM-only ideal."""

    def __init__(self, config, rows: int, dtype: torch.dtype):
        super().__init__(config=config)
        table = torch.randn(rows, config.hidden_size, device=device(), dtype=dtype)
        self.register_buffer("table", table, persistent=False)

    def forward(self, batch) -> VisualOutput:
        return VisualOutput(self.table[: len(batch.visual_positions)])


class IdealStage(Discrete):
    """The discrete run's stage with the visual embeddings given: the LLM step alone."""

    def build_visual(self, cfg, llm_config) -> GivenEmbeddings:
        return GivenEmbeddings(llm_config, cfg.data.seq_length, params_dtype(cfg.model.params_dtype))


def time_paths(trainers: dict, warmup: int, steps: int, pause: float) -> dict[str, list[tuple[float, float]]]:
    """(step time, data wait) of each path's `steps` timed steps, after `warmup` untimed ones.
    Before each step: garbage collection and a `pause`, untimed, so the previous path's
    DataLoader workers finish refilling their queue."""
    times = {path: [] for path in trainers}
    for step in range(warmup + steps):
        for path, trainer in trainers.items():
            gc.collect()  # torchtitan's manual GC: never inside a timed step
            time.sleep(pause)
            metrics = trainer.train_step()
            if step >= warmup:
                times[path].append((metrics["step_time_s"], metrics["data_time_s"]))
    return times


def profile_paths(trainers: dict, folder: Path, stem: str, cuda: bool) -> None:
    """A torch.profiler trace (FOLDER/STEM_PATH.json) and operator table (.txt) of 2 steps per path."""
    folder.mkdir(parents=True, exist_ok=True)
    for path, trainer in trainers.items():
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(2):
                trainer.train_step()
        prefix = folder / f"{stem}_{path}"
        profiler.export_chrome_trace(f"{prefix}.json")
        Path(f"{prefix}.txt").write_text(
            profiler.key_averages().table(
                sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30
            )
        )


def medians(times: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """path -> (median step time, median data wait)."""
    return {
        path: (statistics.median(t for t, _ in v), statistics.median(dt for _, dt in v)) for path, v in times.items()
    }


def mode_result(llm: str, length: int, mode: str, times: dict, proportions: dict, stored: dict) -> dict:
    """One table row's numbers: the continuous path with the encoder `mode` against the others."""
    median = medians(times)
    continuous_s, data_s = median[f"continuous_{mode}"]
    discrete_s, ideal_s = median["discrete"][0], median["ideal"][0]
    result = {
        "llm": llm,
        "seq_length": length,
        "encoder": mode,
        "continuous_s": continuous_s,
        "continuous_data_s": data_s,
        "discrete_s": discrete_s,
        "discrete_data_s": median["discrete"][1],
        "ideal_s": ideal_s,
        "ideal_data_s": median["ideal"][1],
        "speedup": continuous_s / discrete_s,
        "measured_ideal": continuous_s / ideal_s,
        "flop_ideal": flop_ideal(proportions["encoder_per_llm_bench"], mode == "trained"),
        **proportions,
        "bytes_per_patch": stored,
        "step_times_s": {path: [t for t, _ in v] for path, v in times.items()},
        "data_times_s": {path: [dt for _, dt in v] for path, v in times.items()},
    }
    if mode == "frozen" and "cached" in median:  # the cached features are the frozen encoder's
        result.update(cached_s=median["cached"][0], cached_data_s=median["cached"][1])
    return result
