"""Packed native-resolution encoding vs padded batches: viq_megatron/cli/bench_encoder.py (viq-bench-encoder)."""

import sys

from viq_megatron.cli.bench_encoder import main

if __name__ == "__main__":
    sys.exit(main())
