"""Does the LLM read the image? Codes vs features vs blind: viq_megatron/cli/bench_quality.py (viq-bench-quality)."""

import sys

from viq_megatron.cli.bench_quality import main

if __name__ == "__main__":
    sys.exit(main())
