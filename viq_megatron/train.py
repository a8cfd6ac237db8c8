"""Train a stage: python -m viq_megatron.train --config CONFIG [key.sub=value ...] (under torchrun)."""
from __future__ import annotations

import argparse
import sys

from viq_megatron.config import ConfigError, parse_command_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    args, cfg = parse_command_line(parser, argv)
    if cfg.model.llm is None:
        parser.exit(2, f"error: {args.config}: model.llm: missing (training needs an LLM)\n")
    from viq_megatron.models.hf_llm import CheckpointError
    from viq_megatron.runtime.distributed import shutdown
    from viq_megatron.training.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except (ConfigError, CheckpointError) as e:  # settings only checkable here (TE, FP8, sizes); a bad checkpoint
        parser.exit(2, f"error: {e}\n")
    trainer.train()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
