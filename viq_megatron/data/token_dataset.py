"""Offline visual tokens in Megatron-Core's indexed dataset format (`.bin` / `.idx`).

One document per sample; its sequences, in conversation order, each carry a mode:

    TEXT      text tokens the loss skips (prompts, template)
    ANSWER    text tokens the loss is taken on (the assistant's)
    GRID      [grid_h, grid_w]: the next image's patch grid (codes are 2*grid_h x 2*grid_w)
    CODES     the image's ViQ codes, row-major over its code grid (one per 8x8 pixels)
    FEATURES  or (`preprocess_images.py --features`, the cached-features baseline) the image's
              encoder tokens [grid_h * grid_w, width], row-major over its patch grid, in bf16:
              two values in each int32

int32 throughout (text vocabularies exceed uint16). Megatron-Core's own
`IndexedDataset(prefix, multimodal=True)` reads the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from viq_megatron.data.text import tokenize_conversation
from viq_megatron.runtime.errors import InputError, first_line

TEXT, ANSWER, GRID, CODES, FEATURES = 0, 1, 2, 3, 4


def features_to_int32(features: torch.Tensor) -> np.ndarray:
    """Encoder tokens [patches, width] (width even) -> bf16 bit patterns, two per int32, flat."""
    if features.shape[-1] % 2:
        raise ValueError(f"encoder features of odd width {features.shape[-1]} do not pack two per int32")
    return features.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.int32).reshape(-1)


def features_from_int32(values: np.ndarray, width: int) -> torch.Tensor:
    """`features_to_int32`'s inverse: [patches, width] bf16."""
    return (
        torch.from_numpy(np.ascontiguousarray(values, dtype=np.int32).view(np.int16))
        .view(torch.bfloat16)
        .reshape(-1, width)
    )


@dataclass
class TokenSample:
    """A sample as stored: (mode, int32 array) segments in order."""

    segments: list[tuple[int, np.ndarray]]

    @property
    def num_images(self) -> int:
        return sum(mode == GRID for mode, _ in self.segments)

    @property
    def num_patches(self) -> int:
        return sum(int(seq[0]) * int(seq[1]) for mode, seq in self.segments if mode == GRID)


def encode_token_sample(sample, tok, text_tok, features: bool = False) -> TokenSample:
    """A conversation with images (a data.conversations.Sample) -> the TokenSample stored for it:
    each image as GRID + its ViQ codes from `tok`, or with `features` its encoder tokens; the text
    through `text_tok` as runs of TEXT / ANSWER by loss flag. Raises ImageError for an unusable image."""
    images = list(sample.images)
    encoded = (tok.encoder_features(images) if features else [e.codes for e in tok.encode(images)]) if images else []
    segments = []
    for piece in tokenize_conversation(text_tok, sample.turns).pieces:
        if piece[0] == "image":
            visual = encoded[piece[1]]
            if features:  # [grid_h, grid_w, width]
                segments.append((GRID, np.array(visual.shape[:2])))
                segments.append((FEATURES, features_to_int32(visual.reshape(-1, visual.shape[-1]))))
            else:  # [2 * grid_h, 2 * grid_w]
                segments.append((GRID, np.array([visual.shape[0] // 2, visual.shape[1] // 2])))
                segments.append((CODES, visual.reshape(-1).numpy()))
            continue
        ids, flags = piece[1], piece[2]
        start = 0
        for k in range(1, len(ids) + 1):  # runs of equal loss flags
            if k == len(ids) or flags[k] != flags[start]:
                segments.append((ANSWER if flags[start] else TEXT, np.array(ids[start:k])))
                start = k
    return TokenSample(segments)


class TokenDatasetWriter:
    """Writes PREFIX.bin / PREFIX.idx under temporary names (PREFIX.writing.*), then moves them
    into place: the old `.idx` goes first and the new one comes last, so a reader finds the old
    pair, the new pair or no dataset, never one file of each."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.staging = f"{self.prefix}.writing"
        self.builder = IndexedDatasetBuilder(f"{self.staging}.bin", dtype=np.int32, multimodal=True)

    def add(self, sample: TokenSample) -> None:
        for mode, values in sample.segments:
            self.builder.add_item(torch.from_numpy(np.asarray(values, dtype=np.int32)), mode=mode)
        self.builder.end_document()

    def append_dataset(self, prefix: str | Path) -> None:
        self.builder.add_index(str(prefix))

    def finalize(self) -> None:
        self.builder.finalize(f"{self.staging}.idx")
        for suffix in (".bin", ".idx"):
            with open(f"{self.staging}{suffix}", "rb") as f:
                os.fsync(f.fileno())
        Path(f"{self.prefix}.idx").unlink(missing_ok=True)
        os.replace(f"{self.staging}.bin", f"{self.prefix}.bin")
        os.replace(f"{self.staging}.idx", f"{self.prefix}.idx")


class TokenDataset:
    """Samples back from the files, through Megatron-Core's IndexedDataset."""

    def __init__(self, prefix: str | Path):
        for suffix in (".idx", ".bin"):
            if not os.path.isfile(f"{prefix}{suffix}"):
                raise InputError(
                    f"{prefix}{suffix}: no such file (tools/preprocess_images.py writes the pair; "
                    "a merge it did not finish leaves none)"
                )
        try:
            self.data = IndexedDataset(str(prefix), multimodal=True)
        except Exception as e:  # noqa: BLE001 - Megatron-Core asserts on a damaged header
            raise InputError(f"{prefix}.idx: not a token dataset index ({first_line(e)})") from None
        self.documents = self.data.document_indices
        index = self.data.index
        expected = (
            int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
            if len(index.sequence_lengths)
            else 0
        )
        actual = os.path.getsize(f"{prefix}.bin")
        if actual != expected:
            raise InputError(
                f"{prefix}.bin: {actual} bytes, but {prefix}.idx describes {expected}: the pair does "
                "not belong together (rerun tools/preprocess_images.py)"
            )

    def __len__(self) -> int:
        return len(self.documents) - 1

    def __getitem__(self, index: int) -> TokenSample:
        first, last = int(self.documents[index]), int(self.documents[index + 1])
        if first == last:
            return TokenSample([])
        sequences, modes = self.data[first:last]
        # Copies: the arrays would otherwise view a memory map that closes with the dataset.
        return TokenSample([(int(m), np.array(s)) for s, m in zip(sequences, modes)])


def codebook_counts(prefix: str | Path, codebook_size: int) -> torch.Tensor:
    """How often each code occurs in a token dataset."""
    data, counts = TokenDataset(prefix), torch.zeros(codebook_size, dtype=torch.int64)
    for index in range(len(data)):
        for mode, values in data[index].segments:
            if mode == CODES:
                counts += torch.bincount(torch.from_numpy(values).long(), minlength=codebook_size)
    return counts


def visual_bytes(prefix: str | Path) -> int:
    """Bytes a token dataset spends on images (codes or features; the grids aside)."""
    index = TokenDataset(prefix).data.index
    visual = (index.sequence_modes == CODES) | (index.sequence_modes == FEATURES)
    return int(index.sequence_lengths[visual].sum()) * index.dtype_size
