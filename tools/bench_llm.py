"""LLM training-step throughput and MFU at Qwen2.5 shapes: viq_megatron/cli/bench_llm.py (viq-bench-llm)."""

import sys

from viq_megatron.cli.bench_llm import main

if __name__ == "__main__":
    sys.exit(main())
