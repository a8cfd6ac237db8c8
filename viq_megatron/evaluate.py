"""Answer LLaVA-style questions with a trained multimodal model: greedy decoding, answers as JSONL.

    python -m viq_megatron.evaluate --config CFG --checkpoint RUN_DIR --questions q.jsonl --out answers.jsonl \\
        [--max-new-tokens 32] [--batch-size 8] [--text-tokenizer PATH] [key.sub=value ...]
    torchrun --nproc-per-node 8 -m viq_megatron.evaluate ... parallel.tensor_model_parallel_size=2

Questions: the training format (a JSON list or JSONL of {"id", "image", "conversations"}),
where the last human turn is the question and a gpt turn after it, if any, the reference
answer; or LLaVA's evaluation format {"question_id", "image", "text"}; or, for a discrete
model, offline token files (tools/preprocess_images.py): each sample's first answer is the
reference, its images are read as the ViQ codes stored there. A question is laid out exactly
as a training sample is, up to where its answer starts. `--batch-size`
questions are packed into one sequence (cu_seqlens keep them apart) and decoded greedily
until EOS or `--max-new-tokens`; each new token reruns the whole LLM forward pass (no KV
cache: simple, and cheap at answer lengths), the visual input runs once per batch.

Output: one JSON line per question, in input order: {"id", "question", "answer", "reference"}
("id": the sample's id or question_id, else its index). With references, the exact-match
accuracy after `normalize` is printed. Under torchrun the questions are split over the
data-parallel ranks, each tensor-parallel group decodes its share from full (gathered)
logits, and rank 0 writes the file. Pipeline parallelism is not supported here.

The model is rebuilt by viq_megatron.inference: the config's stage (training/stages/) with the
run's checkpoint loaded over it; a discrete or cached run reads questions with images through
model.viq_tokenizer (the same codes, bit for bit). A frozen pretrained LLM that the checkpoint
leaves out comes from model.llm.checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from viq_megatron.runtime.extras import quiet_megatron_warnings

quiet_megatron_warnings()  # a program: before megatron-core loads (it warns while importing)

import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from viq_megatron.config import Config, ConfigError, ImageConfig, parse_command_line
from viq_megatron.data.conversations import Sample, SampleError, read_conversations
from viq_megatron.data.images import ImageError
from viq_megatron.data.multimodal import EncodedSample, encode_sample, offline_sample
from viq_megatron.data.text import IMAGE_PLACEHOLDER, TextTokenizer, normalize, stop_ids
from viq_megatron.data.token_dataset import TokenDataset
from viq_megatron.inference import generate, load_model, load_text_tokenizer
from viq_megatron.runtime.distributed import initialize, is_main_process, setup_logging, shutdown
from viq_megatron.runtime.errors import check_writable, one_line_errors
from viq_megatron.training.checkpoint import checkpoint_step

log = logging.getLogger("viq_megatron.evaluate")


@dataclass
class Question:
    index: int  # position in the question file
    id: object  # the sample's id / question_id, else its index
    sample: Sample | None  # the turns up to and including the question (None: an offline `prompt`)
    question: str
    reference: str | None
    prompt: EncodedSample | None = None  # offline samples: laid out already, images as ViQ codes

    def layout(self, tokenizer: TextTokenizer, rules: ImageConfig, patch: int) -> EncodedSample:
        """The prompt: the sample laid out as training lays it out, up to where the answer starts."""
        if self.prompt is not None:
            return self.prompt
        try:
            return encode_sample(self.sample, tokenizer, rules, patch, None, generation_prompt=True)
        except ImageError as e:
            raise ImageError(f"{self.sample.source}: {e}") from None


def read_questions(path: str | Path, root: str | None = None, allow_outside_root: bool = False) -> list[Question]:
    """All questions of a file; raises SampleError (one line naming the file and sample) on a bad one."""
    questions = []
    for index, item in enumerate(read_conversations(path, root or None, allow_outside_root, questions=True)):
        if isinstance(item, SampleError):
            raise item
        users = [k for k, turn in enumerate(item.turns) if turn.role == "user"]
        if not users:
            raise SampleError(f"{path}: sample {index}: no human turn to answer")
        last = users[-1]
        replies = [turn.text for turn in item.turns[last + 1 :] if turn.role == "assistant"]
        questions.append(
            Question(
                index,
                index if item.id is None else item.id,
                replace(item, turns=item.turns[: last + 1]),
                item.turns[last].text.replace(IMAGE_PLACEHOLDER, "").strip(),
                replies[0] if replies else None,
            )
        )
    if not questions:
        raise SampleError(f"{path}: no questions")
    return questions


def read_offline_questions(
    prefix: str | Path, tokenizer: TextTokenizer, feature_width: int | None = None
) -> list[Question]:
    """The first question of each sample of an offline token dataset (tools/preprocess_images.py):
    its tokens up to the first answer, its images as ViQ codes (or stored features of
    `feature_width`); the reference is that answer."""
    data, stop, questions = TokenDataset(prefix), stop_ids(tokenizer), []
    for index in range(len(data)):
        sample = offline_sample(data[index], f"{prefix}:{index}", feature_width)
        if True not in sample.loss_flags:
            raise SampleError(f"{prefix}: sample {index}: no answer to ask for")
        start = end = sample.loss_flags.index(True)
        while end < len(sample) and sample.loss_flags[end]:
            end += 1
        slots = [p for p in sample.visual_slots if p < start]
        visual = sample.features if feature_width else sample.codes
        images, patches = 0, 0  # the images laid out before the answer
        while images < len(visual) and patches + len(visual[images]) <= len(slots):
            patches += len(visual[images])
            images += 1
        prompt = EncodedSample(
            sample.source,
            sample.token_ids[:start],
            sample.loss_flags[:start],
            slots,
            [],
            [],
            sample.codes[:images],
            sample.features[:images],
        )
        question = sample.token_ids[slots[-1] + 1 if slots else 0 : start]
        reference = [t for t in sample.token_ids[start:end] if t not in stop]
        questions.append(
            Question(
                index, index, None, tokenizer.decode(question).strip(), tokenizer.decode(reference).strip(), prompt
            )
        )
    if not questions:
        raise SampleError(f"{prefix}: no questions")
    return questions


def answer_questions(
    model,
    questions: list[Question],
    tokenizer: TextTokenizer,
    rules: ImageConfig,
    patch: int,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = False,
) -> list[dict]:
    """One result per question, in the given order; an unusable image is a one-line ImageError
    naming the sample."""
    results, stop = [], stop_ids(tokenizer)
    with tqdm(total=len(questions), desc="answering", unit="q", disable=not progress) as bar:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            prompts = [q.layout(tokenizer, rules, patch) for q in chunk]
            for q, ids in zip(chunk, generate(model, prompts, stop, max_new_tokens, tokenizer.vocab_size)):
                results.append(
                    {
                        "index": q.index,
                        "id": q.id,
                        "question": q.question,
                        "answer": tokenizer.decode(ids).strip(),
                        "reference": q.reference,
                    }
                )
            bar.update(len(chunk))
    return results


def answer_data_parallel(
    model, questions: list[Question], tokenizer: TextTokenizer, visual_cfg: Config, batch_size: int, max_new_tokens: int
) -> list[dict]:
    """answer_questions with the questions split over the data-parallel ranks; every result, in
    question order, on rank 0 (an empty list elsewhere). Collective."""
    rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mine = answer_questions(
        model,
        questions[rank::size],
        tokenizer,
        visual_cfg.data.image,
        visual_cfg.model.encoder.patch_size,
        batch_size,
        max_new_tokens,
        progress=is_main_process(),
    )
    gathered = [None] * dist.get_world_size() if is_main_process() else None
    dist.gather_object(mine, gathered, dst=0)  # tensor-parallel peers send the same answers
    if not is_main_process():
        return []
    return sorted({r["index"]: r for part in gathered for r in part}.values(), key=lambda r: r["index"])


def accuracy(results: list[dict]) -> tuple[int, int]:
    """(exact matches after normalisation, questions with a reference)."""
    scored = [r for r in results if r["reference"] is not None]
    return sum(normalize(r["answer"]) == normalize(r["reference"]) for r in scored), len(scored)


def run(
    cfg: Config,
    checkpoint: Path,
    questions: list[Question],
    out: Path,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    text_tokenizer: str | None = None,
) -> list[dict]:
    """Answers this data-parallel rank's share, gathers every answer on rank 0, which writes
    `out`. Offline questions (read_offline_questions) are answered from their ViQ codes by the
    discrete model, others from their images. Collective; needs the distributed runtime
    (initialize). Returns all results on rank 0."""
    tokenizer = load_text_tokenizer(cfg, Path(checkpoint), text_tokenizer)
    model, visual_cfg = load_model(cfg, checkpoint, online=all(q.prompt is None for q in questions))
    start = time.perf_counter()
    results = answer_data_parallel(model, questions, tokenizer, visual_cfg, batch_size, max_new_tokens)
    if not is_main_process():
        return []
    lines = [{k: v for k, v in r.items() if k != "index" and not (k == "reference" and v is None)} for r in results]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tmp.replace(out)  # a complete file or none
    log.info("answered %d questions in %.1f s; wrote %s", len(results), time.perf_counter() - start, out)
    correct, total = accuracy(results)
    if total:
        log.info("accuracy: %.3f (%d of %d exact matches after normalisation)", correct / total, correct, total)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run's output_dir, or one of its checkpoints")
    parser.add_argument(
        "--questions",
        required=True,
        type=Path,
        help="LLaVA-style JSON/JSONL question file, or the prefix of offline token files "
        "(tools/preprocess_images.py) for a discrete model",
    )
    parser.add_argument("--out", required=True, type=Path, help="answers, one JSON line per question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="questions decoded together in one packed sequence")
    parser.add_argument("--text-tokenizer", help="SentencePiece .model or HF tokenizer folder (default: the run's)")
    args, cfg = parse_command_line(parser, argv, required=False)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.exit(2, "error: --batch-size and --max-new-tokens must be >= 1\n")
    offline = Path(f"{args.questions}.idx").is_file()
    with one_line_errors(parser):  # questions, config, checkpoint and output are checked before any model is built
        if not offline:
            questions = read_questions(args.questions, cfg.data.root, cfg.data.allow_outside_root)
        if cfg.model.llm is None:
            raise ConfigError(f"{args.config or 'defaults'}: model.llm: missing (pass the run's --config)")
        checkpoint_step(args.checkpoint)
        check_writable(args.out)
        if offline:
            questions = read_offline_questions(
                args.questions, load_text_tokenizer(cfg, args.checkpoint, args.text_tokenizer)
            )
    setup_logging(initialize(cfg.parallel, cfg.seed).rank)
    with one_line_errors(parser):
        run(cfg, args.checkpoint, questions, args.out, args.batch_size, args.max_new_tokens, args.text_tokenizer)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
