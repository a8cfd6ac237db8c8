"""Pick a parallel layout; estimate memory and step time: viq_megatron/cli/plan_layout.py (viq-plan-layout)."""

import sys

from viq_megatron.cli.plan_layout import main

if __name__ == "__main__":
    sys.exit(main())
