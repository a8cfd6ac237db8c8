"""Overhead of the CPU compatibility layer: viq_megatron/cli/bench_cpu_compat.py (viq-bench-cpu-compat)."""

import sys

from viq_megatron.cli.bench_cpu_compat import main

if __name__ == "__main__":
    sys.exit(main())
