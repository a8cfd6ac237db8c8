"""Discrete vs continuous training speed, by the Trainer: viq_megatron/cli/bench_speedup.py (viq-bench-speedup)."""

import sys

from viq_megatron.cli.bench_speedup import main

if __name__ == "__main__":
    sys.exit(main())
