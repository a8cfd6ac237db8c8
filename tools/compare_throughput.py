"""Training throughput logs compared: viq_megatron/cli/compare_throughput.py (viq-compare-throughput)."""

import sys

from viq_megatron.cli.compare_throughput import main

if __name__ == "__main__":
    sys.exit(main())
