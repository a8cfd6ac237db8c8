"""Hugging Face Llama / Qwen2 checkpoints <-> our LLM checkpoints: viq_megatron/cli/convert_hf.py (viq-convert-hf)."""

import sys

from viq_megatron.cli.convert_hf import main

if __name__ == "__main__":
    sys.exit(main())
