"""Export a trained multimodal model for Hugging Face harnesses: viq_megatron/cli/export_hf.py (viq-export-hf)."""

import sys

from viq_megatron.cli.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
