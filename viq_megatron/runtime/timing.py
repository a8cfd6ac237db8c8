"""Phase timing without host synchronisation.

On a GPU the work of a phase runs after the host has moved on, so host clocks around it
measure launch time, and a `torch.cuda.synchronize()` per phase stalls the step. Here each
span records a pair of CUDA events on the current stream; the durations are read (one wait)
only when a logged step asks for them. On the CPU work is synchronous and spans use the
wall clock.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self._spans: dict[str, list] = defaultdict(list)

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Adds the duration of the block's device work to phase `name`."""
        start = self._now()
        try:
            yield
        finally:
            self._spans[name].append((start, self._now()))

    def read(self) -> dict[str, float]:
        """{phase: seconds} since the last read; waits for the recorded work (call it when logging)."""
        seconds = {}
        for name, spans in self._spans.items():
            if self.cuda:
                spans[-1][1].synchronize()
                seconds[name] = sum(start.elapsed_time(end) for start, end in spans) / 1e3
            else:
                seconds[name] = sum(end - start for start, end in spans)
        self._spans.clear()
        return seconds
