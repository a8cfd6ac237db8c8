"""A run's datasets and text tokenizer, built from the config once, before the model.

Conversations with image files (LLaVA-style JSON/JSONL, or the generated embedded dataset,
written into the run's folder) for the image stages; offline token files of ViQ codes or
cached encoder features for the others. The text tokenizer is the LLM checkpoint's own, a
given SentencePiece model, or one trained here on the training texts (tiny test LLMs).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from viq_megatron.config import Config, ConfigError
from viq_megatron.data.conversations import Sample, SampleError, read_conversations
from viq_megatron.data.embedded import write_embedded_dataset
from viq_megatron.data.multimodal import PackedConversationDataset, PackedTokenDataset
from viq_megatron.data.text import HFTokenizer, SentencePieceTokenizer, TextTokenizer
from viq_megatron.runtime.distributed import is_main_process
from viq_megatron.runtime.errors import InputError, writing

log = logging.getLogger("viq_megatron.data")


@dataclass
class TrainingData:
    train: PackedConversationDataset | PackedTokenDataset
    val: PackedConversationDataset | PackedTokenDataset
    malformed: int  # samples skipped as malformed while reading (each logged)


def build_training_data(
    cfg: Config,
    kind: str,
    output_dir: Path,
    vocab_size: int,
    teacher_images: bool = False,
    feature_width: int | None = None,
) -> TrainingData:
    """`kind`: "conversations", "codes" or "features" (a stage's `data`); `vocab_size`: the LLM's
    (a trained tokenizer must fit it); `teacher_images`: rows also carry stage 1's fixed-resolution
    views; `feature_width`: the stored features' width. Collective (every rank calls it)."""
    if kind != "conversations":
        width = feature_width if kind == "features" else None
        return TrainingData(
            PackedTokenDataset(cfg.data.train, cfg.data.seq_length, cfg.seed, feature_width=width),
            PackedTokenDataset(cfg.data.val, cfg.data.seq_length, cfg.seed, shuffle=False, feature_width=width),
            0,
        )
    embedded = None
    if "embedded" in (cfg.data.train, cfg.data.val):
        folder = output_dir / "embedded_data"
        if is_main_process():
            with writing(folder):
                write_embedded_dataset(folder, cfg.data.embedded, cfg.seed)
        dist.barrier()
        embedded = (folder / "train.jsonl", folder / "val.jsonl")
    malformed = [0]
    train_samples = _read_split(cfg, "train", embedded, malformed)
    if not train_samples:  # rather than SentencePiece's or the packer's error about nothing
        raise InputError(
            f"{embedded[0] if cfg.data.train == 'embedded' else cfg.data.train}: no usable training "
            f"sample ({malformed[0]} malformed, see the warnings above)"
        )
    val_samples = _read_split(cfg, "val", embedded, malformed)
    tokenizer = build_text_tokenizer(cfg, train_samples, output_dir, vocab_size)
    common = dict(
        tokenizer=tokenizer,
        rules=cfg.data.image,
        patch=cfg.model.encoder.patch_size,
        seq_length=cfg.data.seq_length,
        teacher_side=cfg.data.teacher_image_size if teacher_images else None,
        seed=cfg.seed,
    )
    return TrainingData(
        PackedConversationDataset(train_samples, augment=cfg.data.augment, **common),
        PackedConversationDataset(val_samples, shuffle=False, **common),
        malformed[0],
    )


def _read_split(cfg: Config, which: str, embedded_files: tuple[Path, Path] | None, malformed: list[int]) -> list:
    path = getattr(cfg.data, which)
    if path == "embedded":
        path = embedded_files[0 if which == "train" else 1]
    samples = []
    for item in read_conversations(path, cfg.data.root or None, cfg.data.allow_outside_root):
        if isinstance(item, SampleError):
            log.warning("skipped sample %s", item)
            malformed[0] += 1
        else:
            samples.append(item)
    return samples


def build_text_tokenizer(cfg: Config, train_samples: list[Sample], output_dir: Path, vocab_size: int) -> TextTokenizer:
    """The LLM checkpoint's tokenizer, or a SentencePiece model kept in the run's folder (evaluation
    looks for it there): a given one copied, else one trained on the training texts. Collective."""
    llm = cfg.model.llm
    if llm.tokenizer.kind == "checkpoint":
        source = Path(llm.checkpoint) / "tokenizer"
        tokenizer = HFTokenizer(source)
    else:
        source = output_dir / "tokenizer.model"
        if is_main_process():
            if llm.tokenizer.sentencepiece_model:
                source.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(llm.tokenizer.sentencepiece_model, source)
            else:
                SentencePieceTokenizer.train(
                    (t.text for s in train_samples for t in s.turns),
                    llm.tokenizer.sentencepiece_vocab_size,
                    source.with_suffix(""),
                )
        dist.barrier()
        tokenizer = SentencePieceTokenizer(source)
    if tokenizer.vocab_size > vocab_size:  # ids past the embedding table would index out of range
        raise ConfigError(
            f"{llm.tokenizer.sentencepiece_model or source}: its {tokenizer.vocab_size} tokens do not "
            f"fit the LLM's vocabulary of {vocab_size} (model.llm)"
        )
    return tokenizer
