"""A trained model, rebuilt from a run, answering: the library under evaluation and the exports.

    model, visual_cfg = load_model(cfg, "runs/quickstart/stage1")      # collective; eval mode
    answers = generate(model, prompts, stop_ids(tokenizer), max_new_tokens=16)

The model is built by the config's stage (training/stages/: what it holds, what its checkpoint
leaves to inference) through the model provider, and the run's checkpoint is loaded over it.
Decoding calls the model's own forward pass, the one training runs, with logits instead of a
loss: a question is laid out exactly as a training sample up to where its answer starts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

from viq_megatron.config import Config, require
from viq_megatron.data.multimodal import EncodedSample, PackedBatch, pack_samples
from viq_megatron.data.text import HFTokenizer, SentencePieceTokenizer, TextTokenizer, open_text_tokenizer
from viq_megatron.models.hf_llm import CheckpointError
from viq_megatron.models.multimodal import VisionLanguageModel, VisualOutput
from viq_megatron.runtime.errors import InputError
from viq_megatron.training.checkpoint import checkpoint_step, left_out, load_shared_weights
from viq_megatron.training.stages import STAGES, stage_for


def check_answering(cfg: Config, offline: bool = False) -> None:
    """A config whose model answers questions (with `offline`: from stored codes or features)."""
    require(cfg.model.llm is not None, "model.llm", "missing (answering questions needs an LLM)")
    stage = stage_for(cfg)
    answering = [name for name, s in STAGES.items() if s.answers]
    require(stage.answers, "train.stage", f"{cfg.train.stage!r} has no LLM; use one of {', '.join(answering)}")
    require(
        cfg.parallel.pipeline_model_parallel_size == 1,
        "parallel.pipeline_model_parallel_size",
        "evaluation keeps the whole LLM on each rank; use 1",
    )
    require(
        not offline or stage.data != "conversations",
        "train.stage",
        f"offline ViQ codes or features are read by a discrete- or cached-stage model, not {cfg.train.stage}",
    )


def load_model(cfg: Config, checkpoint: str | Path, online: bool = True) -> tuple[VisionLanguageModel, Config]:
    """(the model in eval mode, the config its visual input reads images with): the config's stage
    with the checkpoint's weights; with `online` a model on offline codes or features reads images
    through model.viq_tokenizer instead. Collective (every rank calls it). A tensor the model needs
    that neither the checkpoint nor a pretrained source provides is a one-line error."""
    check_answering(cfg, offline=not online)
    step = checkpoint_step(checkpoint)
    model, visual_cfg, elsewhere = stage_for(cfg).inference_model(cfg, online)
    available = dist_checkpointing.load_tensors_metadata(str(step))
    missing = [
        v.key
        for v in model.sharded_state_dict().values()
        if isinstance(v, (ShardedTensor, ShardedTensorFactory))
        and v.key not in available
        and not left_out(cfg, v.key)
        and not v.key.startswith(elsewhere)
    ]
    if missing:
        raise CheckpointError(
            f"{step}: tensor {missing[0]} is missing (not a checkpoint of this config's {cfg.train.stage} model?)"
        )
    load_shared_weights([model], step)
    return model.eval(), visual_cfg


def load_text_tokenizer(cfg: Config, checkpoint: Path, path: str | None = None) -> TextTokenizer:
    """The tokenizer the run trained with: `path` (a SentencePiece .model or an HF tokenizer
    folder) when given, else the LLM checkpoint's own, else the configured SentencePiece model,
    else the one the run trained."""
    if path:
        return open_text_tokenizer(path)
    if cfg.model.llm.tokenizer.kind == "checkpoint":
        return HFTokenizer(Path(cfg.model.llm.checkpoint) / "tokenizer")
    if cfg.model.llm.tokenizer.sentencepiece_model:
        return SentencePieceTokenizer(cfg.model.llm.tokenizer.sentencepiece_model)
    for folder in (checkpoint, *checkpoint.parents[:3]):  # a run dir, its checkpoints/ or one step
        if (folder / "tokenizer.model").is_file():
            return SentencePieceTokenizer(folder / "tokenizer.model")
    raise InputError(
        f"{checkpoint}: no tokenizer.model in the run (the SentencePiece tokenizer it "
        "trained with); pass --text-tokenizer"
    )


def next_token_logits(
    model: VisionLanguageModel, batch: PackedBatch, visual: VisualOutput | None = None
) -> torch.Tensor:
    """Full-vocabulary logits [samples, vocab] after the last token of each sample of `batch`
    (labels None): the model's forward pass, gathered over tensor-parallel ranks."""
    logits = model(batch, visual).logits
    return logits[batch.cu_seqlens[1:].long() - 1].float()


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    prompts: list[EncodedSample],
    stop: set[int],
    max_new_tokens: int,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Greedy answers (token ids, the stop token left out) to prompts decoded together in one
    packed sequence; the visual input runs once, each new token reruns the LLM over the row (no
    KV cache: simple, and cheap at answer lengths). Ids from `vocab_size` on (embedding rows the
    tokenizer has no piece for) are never chosen."""
    first = pack_samples(prompts)
    visual = model.visual(first) if len(first.visual_positions) else None
    answers: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        tokens = [prompts[i].token_ids + answers[i] for i in active]
        rows = [
            replace(
                prompts[i],
                token_ids=t,
                loss_flags=[False] * len(t),
                images=[],
                teacher_images=[],
                codes=[],
                features=[],
            )
            for i, t in zip(active, tokens)
        ]
        batch = replace(pack_samples(rows), labels=None)
        logits = next_token_logits(model, batch, _visual_of(visual, prompts, active))
        if vocab_size is not None:
            logits[:, vocab_size:] = -float("inf")
        for i, token in zip(active, logits.argmax(-1).tolist()):
            answers[i].append(token)
        active = [i for i in active if answers[i][-1] not in stop]
        if not active:
            break
    return [a[:-1] if a and a[-1] in stop else a for a in answers]


def _visual_of(visual: VisualOutput | None, prompts: list[EncodedSample], active: list[int]) -> VisualOutput | None:
    """The visual embeddings of the `active` prompts, prompt after prompt."""
    if visual is None:
        return None
    parts = visual.embeddings.split([len(p.visual_slots) for p in prompts])
    return VisualOutput(torch.cat([parts[i] for i in active]))
