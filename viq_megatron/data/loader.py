"""Packed rows built ahead of the step, in DataLoader workers.

Decoding, resizing and patchifying images (the continuous path) or reading token files (the
discrete path) happens in `data.num_workers` worker processes while the device computes;
rows arrive pinned, so their copies to the GPU do not block the host. The rows a rank reads
stay a pure function of (seed, step): a resumed run starts the loader at its step and reads
exactly what an uninterrupted run read.
"""
from __future__ import annotations

import itertools
import os
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from viq_megatron.data.multimodal import PackedBatch


class StepRows(Sampler[int]):
    """The row indices this rank reads at steps start, start + 1, ..., in order, without end."""

    def __init__(self, rows_of_step: Callable[[int], list[int]], start: int):
        self.rows_of_step, self.start = rows_of_step, start

    def __iter__(self) -> Iterator[int]:
        for step in itertools.count(self.start):
            yield from self.rows_of_step(step)


def row_loader(dataset: Dataset, rows_of_step: Callable[[int], list[int]], start: int, workers: int,
               prefetch: int) -> Iterator[PackedBatch]:
    """Batches of rows `rows_of_step(start)`, then of the next steps; `workers` 0 builds them here."""
    # The HF tokenizer's own threads must not be forked into the workers (its documented remedy).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return iter(DataLoader(dataset, batch_size=None, sampler=StepRows(rows_of_step, start), num_workers=workers,
                           prefetch_factor=prefetch if workers else None, pin_memory=torch.cuda.is_available(),
                           persistent_workers=False))
