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

The model is the config's stage with the run's checkpoint loaded over it: stage1 and
continuous: encoder + projector; stage2: encoder + ViQ head + projector; discrete: the
run's head + projector embed offline codes, or, for questions with images, the ViQ tokenizer
of model.viq_tokenizer encodes them online first (the same codes, bit for bit); cached: that
tokenizer's encoder reads the images online, then the run's projector. A frozen pretrained LLM
that the checkpoint leaves out comes from model.llm.checkpoint.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import string
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.packed_seq_params import PackedSeqParams
from tqdm import tqdm

from viq_megatron.config import Config, ConfigError, ImageConfig, parse_command_line
from viq_megatron.data.conversations import Sample, SampleError, read_conversations
from viq_megatron.data.images import ImageError
from viq_megatron.data.multimodal import EncodedSample, encode_sample, offline_sample, pack_samples
from viq_megatron.data.text import (IMAGE_PLACEHOLDER, HFTokenizer, SentencePieceTokenizer, TextTokenizer, Turn,
                                    tokenize_conversation)
from viq_megatron.data.token_dataset import TokenDataset
from viq_megatron.models.hf_llm import CheckpointError
from viq_megatron.models.provider import encoder_input, load_prefixed, quantized_input, tokenizer_config
from viq_megatron.runtime.distributed import initialize, is_main_process, setup_logging, shutdown
from viq_megatron.runtime.errors import InputError, check_writable, one_line_errors
from viq_megatron.training.checkpoint import checkpoint_step, left_out, load_shared_weights
from viq_megatron.training.stages import STAGES

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
        replies = [turn.text for turn in item.turns[last + 1:] if turn.role == "assistant"]
        questions.append(Question(index, index if item.id is None else item.id,
                                  replace(item, turns=item.turns[:last + 1]),
                                  item.turns[last].text.replace(IMAGE_PLACEHOLDER, "").strip(),
                                  replies[0] if replies else None))
    if not questions:
        raise SampleError(f"{path}: no questions")
    return questions


def read_offline_questions(prefix: str | Path, tokenizer: TextTokenizer) -> list[Question]:
    """The first question of each sample of an offline token dataset (tools/preprocess_images.py):
    its tokens up to the first answer, its images as ViQ codes; the reference is that answer."""
    data, stop, questions = TokenDataset(prefix), stop_ids(tokenizer), []
    for index in range(len(data)):
        sample = offline_sample(data[index], f"{prefix}:{index}")
        if True not in sample.loss_flags:
            raise SampleError(f"{prefix}: sample {index}: no answer to ask for")
        start = end = sample.loss_flags.index(True)
        while end < len(sample) and sample.loss_flags[end]:
            end += 1
        slots = [p for p in sample.visual_slots if p < start]
        images, patches = 0, 0  # the images laid out before the answer
        while images < len(sample.codes) and patches + len(sample.codes[images]) <= len(slots):
            patches += len(sample.codes[images])
            images += 1
        prompt = EncodedSample(sample.source, sample.token_ids[:start], sample.loss_flags[:start], slots, [], [],
                               sample.codes[:images])
        question = sample.token_ids[slots[-1] + 1 if slots else 0:start]
        reference = [t for t in sample.token_ids[start:end] if t not in stop]
        questions.append(Question(index, index, None, tokenizer.decode(question).strip(),
                                  tokenizer.decode(reference).strip(), prompt))
    if not questions:
        raise SampleError(f"{prefix}: no questions")
    return questions


def stop_ids(tokenizer: TextTokenizer) -> set[int]:
    """Token ids that end an answer: EOS, and the special tokens that close an assistant turn in
    the chat template (e.g. Qwen2.5's <|im_end|>, where EOS is <|endoftext|>)."""
    pieces = tokenize_conversation(tokenizer, [Turn("user", "Hi"), Turn("assistant", "Hello")]).pieces
    answer = [i for piece in pieces if piece[0] == "text" for i, flag in zip(piece[1], piece[2]) if flag]
    special = set(getattr(getattr(tokenizer, "tokenizer", None), "all_special_ids", ()))
    return {tokenizer.eos_id, *(i for i in answer if i in special)}


def normalize(answer: str) -> str:
    """For exact match: lower case, single spaces, no punctuation around words or at the ends."""
    words = (w.strip(string.punctuation) for w in answer.lower().split())
    return " ".join(w for w in words if w)


def load_text_tokenizer(cfg: Config, checkpoint: Path, path: str | None = None) -> TextTokenizer:
    """The tokenizer the run trained with: `path` (a SentencePiece .model or an HF tokenizer
    folder) when given, else the LLM checkpoint's own, else the configured SentencePiece model,
    else the one the run trained."""
    if path:
        return SentencePieceTokenizer(path) if str(path).endswith(".model") else HFTokenizer(path)
    if cfg.model.llm.tokenizer.kind == "checkpoint":
        return HFTokenizer(Path(cfg.model.llm.checkpoint) / "tokenizer")
    if cfg.model.llm.tokenizer.sentencepiece_model:
        return SentencePieceTokenizer(cfg.model.llm.tokenizer.sentencepiece_model)
    for folder in (checkpoint, *checkpoint.parents[:3]):  # a run dir, its checkpoints/ or one step
        if (folder / "tokenizer.model").is_file():
            return SentencePieceTokenizer(folder / "tokenizer.model")
    raise InputError(f"{checkpoint}: no tokenizer.model in the run (the SentencePiece tokenizer it "
                            "trained with); pass --text-tokenizer")


def load_model(cfg: Config, checkpoint: str | Path, online: bool = True):
    """(VisionLanguageModel in eval mode, the config of its visual input): the config's stage
    with the checkpoint's weights. The visual config is `cfg`, or for the discrete stage the ViQ
    tokenizer's (its encoder, head and image rules): with `online` the discrete model reads images
    through the tokenizer, else offline codes as in training. Collective (every rank calls it). A
    tensor the model needs that neither the checkpoint nor a pretrained source provides is a
    one-line error."""
    cfg.check_answering(offline_codes=not online)
    step = checkpoint_step(checkpoint)
    stage = STAGES[cfg.train.stage](cfg)
    model, visual_cfg = stage.chunks[0], cfg
    elsewhere = set()  # key prefixes the model has without the checkpoint
    if cfg.train.stage == "stage1":
        elsewhere.update(("visual.teacher.", "visual.pooling."))  # training only
    if cfg.train.stage in ("discrete", "cached") and online:
        visual_cfg = _online_tokenizer(cfg, model)
        elsewhere.add("visual.")
    available = dist_checkpointing.load_tensors_metadata(str(step))
    missing = [v.key for v in model.sharded_state_dict().values()
               if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and v.key not in available
               and not left_out(cfg, v.key) and not v.key.startswith(tuple(elsewhere))]
    if missing:
        raise CheckpointError(f"{step}: tensor {missing[0]} is missing (not a checkpoint of this "
                              f"config's {cfg.train.stage} model?)")
    load_shared_weights([model], step)
    trained_steps = torch.load(step / "trainer.pt", weights_only=True)["step"]
    stage.on_step(trained_steps)  # schedules that shape the model, e.g. the progressive quantizer's blend
    return model.eval(), visual_cfg


def _online_tokenizer(cfg: Config, model) -> Config:
    """Discrete stage: the visual input becomes the ViQ tokenizer's encoder + head; cached stage:
    its encoder (their weights; the run's checkpoint then overrides the head and holds the
    projector it trained). Returns `cfg` with the tokenizer's encoder, head and image rules (the
    codes or features were made with them)."""
    tokenizer_cfg, _, weights = tokenizer_config(cfg, cfg.model.viq_tokenizer)
    hidden, cached = model.llm.config.hidden_size, cfg.train.stage == "cached"
    model.visual = encoder_input(tokenizer_cfg, hidden) if cached else quantized_input(tokenizer_cfg, hidden)
    for part in ("encoder",) if cached else ("encoder", "head"):  # the run has the projector
        load_prefixed(getattr(model.visual, part), weights, f"visual.{part}.")
    return tokenizer_cfg


def next_token_logits(llm, sequences: list[list[int]], slots: list[list[int]],
                      visual: torch.Tensor | None) -> torch.Tensor:
    """Full-vocabulary logits [len(sequences), vocab] after the last token of each sequence,
    all packed into one row: the training forward pass (visual embeddings in the slots,
    attention and RoPE positions per sequence) with logits instead of a loss, gathered over
    tensor-parallel ranks. `visual`: the embeddings of all slots, sequence after sequence."""
    device = next(llm.parameters()).device
    lengths = [len(s) for s in sequences]
    starts = [0, *itertools.accumulate(lengths)]
    cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
    tokens = torch.tensor([t for s in sequences for t in s], dtype=torch.int64, device=device)[None]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    embeddings = llm.embedding(input_ids=tokens, position_ids=positions)  # [T, 1, hidden]
    places = torch.tensor([start + p for start, s in zip(starts, slots) for p in s], dtype=torch.int64, device=device)
    if len(places):
        embeddings = embeddings.index_put((places, torch.zeros_like(places)), visual.to(embeddings.dtype))
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    logits = llm(input_ids=None, position_ids=None, attention_mask=None, decoder_input=embeddings,
                 packed_seq_params=packed, runtime_gather_output=True)  # [1, T, vocab]
    return logits[0, cu_seqlens[1:].long() - 1].float()


@torch.no_grad()
def generate(model, prompts: list[EncodedSample], stop: set[int], max_new_tokens: int,
             vocab_size: int | None = None) -> list[list[int]]:
    """Greedy answers (token ids, the stop token left out) to prompts decoded together in one
    packed sequence. Ids from `vocab_size` on (embedding rows the tokenizer has no piece for)
    are never chosen."""
    batch = pack_samples(prompts)
    visual = model.visual(batch).embeddings if len(batch.visual_positions) else None
    visuals = list(visual.split([len(p.visual_slots) for p in prompts])) if visual is not None else None
    answers: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        logits = next_token_logits(model.llm, [prompts[i].token_ids + answers[i] for i in active],
                                   [prompts[i].visual_slots for i in active],
                                   torch.cat([visuals[i] for i in active]) if visuals else None)
        if vocab_size is not None:
            logits[:, vocab_size:] = -float("inf")
        for i, token in zip(active, logits.argmax(-1).tolist()):
            answers[i].append(token)
        active = [i for i in active if answers[i][-1] not in stop]
        if not active:
            break
    return [a[:-1] if a and a[-1] in stop else a for a in answers]


def answer_questions(model, questions: list[Question], tokenizer: TextTokenizer, rules: ImageConfig, patch: int,
                     batch_size: int, max_new_tokens: int, progress: bool = False) -> list[dict]:
    """One result per question, in the given order; an unusable image is a one-line ImageError
    naming the sample."""
    results, stop = [], stop_ids(tokenizer)
    with tqdm(total=len(questions), desc="answering", unit="q", disable=not progress) as bar:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            prompts = [q.layout(tokenizer, rules, patch) for q in chunk]
            for q, ids in zip(chunk, generate(model, prompts, stop, max_new_tokens, tokenizer.vocab_size)):
                results.append({"index": q.index, "id": q.id, "question": q.question,
                                "answer": tokenizer.decode(ids).strip(), "reference": q.reference})
            bar.update(len(chunk))
    return results


def answer_data_parallel(model, questions: list[Question], tokenizer: TextTokenizer, visual_cfg: Config,
                         batch_size: int, max_new_tokens: int) -> list[dict]:
    """answer_questions with the questions split over the data-parallel ranks; every result, in
    question order, on rank 0 (an empty list elsewhere). Collective."""
    rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mine = answer_questions(model, questions[rank::size], tokenizer, visual_cfg.data.image,
                            visual_cfg.model.encoder.patch_size, batch_size, max_new_tokens,
                            progress=is_main_process())
    gathered = [None] * dist.get_world_size() if is_main_process() else None
    dist.gather_object(mine, gathered, dst=0)  # tensor-parallel peers send the same answers
    if not is_main_process():
        return []
    return sorted({r["index"]: r for part in gathered for r in part}.values(), key=lambda r: r["index"])


def accuracy(results: list[dict]) -> tuple[int, int]:
    """(exact matches after normalisation, questions with a reference)."""
    scored = [r for r in results if r["reference"] is not None]
    return sum(normalize(r["answer"]) == normalize(r["reference"]) for r in scored), len(scored)


def run(cfg: Config, checkpoint: Path, questions: list[Question], out: Path, batch_size: int = 8,
        max_new_tokens: int = 32, text_tokenizer: str | None = None) -> list[dict]:
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
    parser.add_argument("--questions", required=True, type=Path,
                        help="LLaVA-style JSON/JSONL question file, or the prefix of offline token files "
                             "(tools/preprocess_images.py) for a discrete model")
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
            questions = read_offline_questions(args.questions, load_text_tokenizer(cfg, args.checkpoint,
                                                                                   args.text_tokenizer))
    setup_logging(initialize(cfg.parallel, cfg.seed).rank)
    with one_line_errors(parser):
        run(cfg, args.checkpoint, questions, args.out, args.batch_size, args.max_new_tokens, args.text_tokenizer)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
