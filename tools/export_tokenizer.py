"""Export a trained ViQ tokenizer as a directory: viq_megatron/cli/export_tokenizer.py (viq-export-tokenizer)."""

import sys

from viq_megatron.cli.export_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
