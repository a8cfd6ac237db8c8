"""Train a stage: python -m viq_megatron.train --config CONFIG [key.sub=value ...] (under torchrun)."""
from __future__ import annotations

import argparse
import sys

from viq_megatron.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.model.llm is None:
        print(f"error: {args.config}: model.llm: missing (training needs an LLM)", file=sys.stderr)
        return 2
    from viq_megatron.runtime.distributed import shutdown
    from viq_megatron.training.trainer import Trainer

    Trainer(cfg).train()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
