"""Offline visual tokens in Megatron-Core's indexed dataset format (`.bin` / `.idx`).

One document per sample; its sequences, in conversation order, each carry a mode:

    TEXT      text tokens the loss skips (prompts, template)
    ANSWER    text tokens the loss is taken on (the assistant's)
    GRID      [grid_h, grid_w]: the next image's patch grid (codes are 2*grid_h x 2*grid_w)
    CODES     the image's ViQ codes, row-major over its code grid (one per 8x8 pixels)

int32 throughout (text vocabularies exceed uint16). Megatron-Core's own
`IndexedDataset(prefix, multimodal=True)` reads the files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

TEXT, ANSWER, GRID, CODES = 0, 1, 2, 3


@dataclass
class TokenSample:
    """A sample as stored: (mode, int32 array) segments in order."""

    segments: list[tuple[int, np.ndarray]]

    @property
    def num_images(self) -> int:
        return sum(mode == CODES for mode, _ in self.segments)

    @property
    def num_codes(self) -> int:
        return sum(len(seq) for mode, seq in self.segments if mode == CODES)


class TokenDatasetWriter:
    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.builder = IndexedDatasetBuilder(f"{self.prefix}.bin", dtype=np.int32, multimodal=True)

    def add(self, sample: TokenSample) -> None:
        for mode, values in sample.segments:
            self.builder.add_item(torch.from_numpy(np.asarray(values, dtype=np.int32)), mode=mode)
        self.builder.end_document()

    def append_dataset(self, prefix: str | Path) -> None:
        self.builder.add_index(str(prefix))

    def finalize(self) -> None:
        self.builder.finalize(f"{self.prefix}.idx")


class TokenDataset:
    """Samples back from the files, through Megatron-Core's IndexedDataset."""

    def __init__(self, prefix: str | Path):
        self.data = IndexedDataset(str(prefix), multimodal=True)
        self.documents = self.data.document_indices

    def __len__(self) -> int:
        return len(self.documents) - 1

    def __getitem__(self, index: int) -> TokenSample:
        first, last = int(self.documents[index]), int(self.documents[index + 1])
        if first == last:
            return TokenSample([])
        sequences, modes = self.data[first:last]
        # Copies: the arrays would otherwise view a memory map that closes with the dataset.
        return TokenSample([(int(m), np.array(s)) for s, m in zip(sequences, modes)])
