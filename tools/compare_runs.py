"""Two runs' deterministic outputs compared: viq_megatron/cli/compare_runs.py (viq-compare-runs)."""

import sys

from viq_megatron.cli.compare_runs import main

if __name__ == "__main__":
    sys.exit(main())
