"""Train a stage: python -m viq_megatron.train --config CONFIG [key.sub=value ...] (under torchrun)."""

from __future__ import annotations

import argparse
import sys

from viq_megatron.runtime.extras import quiet_megatron_warnings

quiet_megatron_warnings()  # a program: before megatron-core loads (it warns while importing)

from viq_megatron.config import ConfigError, parse_command_line
from viq_megatron.runtime.distributed import shutdown
from viq_megatron.runtime.errors import one_line_errors
from viq_megatron.training.stages import stage_for
from viq_megatron.training.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    args, cfg = parse_command_line(parser, argv)
    if cfg.model.llm is None:
        parser.exit(2, f"error: {args.config}: model.llm: missing (training needs an LLM)\n")
    try:
        stage_for(cfg)  # what the stage needs of the config, before any process group starts
    except ConfigError as e:
        parser.exit(2, f"error: {args.config or 'defaults'}: {e}\n")
    # Bad data, a bad checkpoint, settings only checkable here (TE, FP8, sizes), an unwritable or full disk.
    with one_line_errors(parser):
        Trainer(cfg).train()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
