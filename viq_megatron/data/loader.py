"""Packed rows built ahead of the step, in DataLoader workers.

Decoding, resizing and patchifying images (the continuous path) or reading token files (the
discrete path) happens in `data.num_workers` worker processes while the device computes;
rows arrive pinned, so their copies to the GPU do not block the host. The rows a rank reads
stay a pure function of (seed, step): a resumed run starts the loader at its step and reads
exactly what an uninterrupted run read.
"""
from __future__ import annotations

import atexit
import itertools
import os
import signal
import weakref
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


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm signals every process of a job (SIGTERM on preemption, SIGUSR1 before the time
    limit): the training process finishes its step and saves, then shuts its workers down, so a
    worker must not die first."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def row_loader(dataset: Dataset, rows_of_step: Callable[[int], list[int]], start: int, workers: int,
               prefetch: int) -> Iterator[PackedBatch]:
    """Batches of rows `rows_of_step(start)`, then of the next steps; `workers` 0 builds them here."""
    # The HF tokenizer's own threads must not be forked into the workers (its documented remedy).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = iter(DataLoader(dataset, batch_size=None, sampler=StepRows(rows_of_step, start), num_workers=workers,
                           prefetch_factor=prefetch if workers else None, pin_memory=torch.cuda.is_available(),
                           persistent_workers=False, worker_init_fn=_ignore_stop_signals if workers else None))
    if workers:  # they ignore SIGTERM, so multiprocessing's exit-time terminate() cannot end them
        atexit.register(_shut_down, weakref.ref(rows))
    return rows


def _shut_down(rows: weakref.ref) -> None:
    """Tells a loader's workers to finish (before multiprocessing's own exit handler runs)."""
    if (iterator := rows()) is not None:
        iterator._shutdown_workers()
