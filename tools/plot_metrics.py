"""Curves over training steps from runs' metrics.jsonl: viq_megatron/cli/plot_metrics.py (viq-plot-metrics)."""

import sys

from viq_megatron.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
