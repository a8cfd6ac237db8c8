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
import multiprocessing
import multiprocessing.util  # noqa: F401 - its exit handler (which terminates workers) must run after ours
import os
import signal
from collections.abc import Callable, Iterator
from functools import partial

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


# Set when the training process exits; its workers get it. Made, and its exit handler
# registered, by the first loader with workers (not at import).
_main_exiting = None


def _exit_flag():
    """The event set when this process exits: made, and registered with `atexit`, once."""
    global _main_exiting
    if _main_exiting is None:
        _main_exiting = multiprocessing.Event()
        atexit.register(_main_exiting.set)
    return _main_exiting


def _stop_signals_to_the_main_process(main_exiting, worker_id: int) -> None:
    """Slurm signals every process of a job (SIGTERM on preemption, SIGUSR1 before the time
    limit): the training process finishes its step and saves, so a worker must not die first
    (torch would fail the step). A SIGTERM once the training process is exiting is its own
    shutdown of the workers, and ends the worker."""

    def on_sigterm(signum, frame):
        if main_exiting.is_set():
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def row_loader(
    dataset: Dataset, rows_of_step: Callable[[int], list[int]], start: int, workers: int, prefetch: int
) -> Iterator[PackedBatch]:
    """Batches of rows `rows_of_step(start)`, then of the next steps; `workers` 0 builds them here."""
    # The HF tokenizer's own threads must not be forked into the workers (its documented remedy).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    init = partial(_stop_signals_to_the_main_process, _exit_flag()) if workers else None
    return iter(
        DataLoader(
            dataset,
            batch_size=None,
            sampler=StepRows(rows_of_step, start),
            num_workers=workers,
            prefetch_factor=prefetch if workers else None,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            worker_init_fn=init,
        )
    )
