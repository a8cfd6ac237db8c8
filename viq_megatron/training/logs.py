"""Training logs: console, tensorboard and a JSONL file, written by the first process only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from viq_megatron.runtime.distributed import is_main_process

log = logging.getLogger("viq_megatron.train")


class MetricsLog:
    def __init__(self, output_dir: str | Path, filename: str = "metrics.jsonl"):
        self.enabled = is_main_process()
        self.writer = None
        self.file = None
        if self.enabled:
            output_dir = Path(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            self.file = open(output_dir / filename, "a")

    def write(self, step: int, split: str, metrics: dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{key}", value, step)
        if console:
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            log.info("[%s] step %d %s", split, step, shown)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.file.close()
