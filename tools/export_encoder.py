"""Export a trained encoder as an encoder directory: viq_megatron/cli/export_encoder.py (viq-export-encoder)."""

import sys

from viq_megatron.cli.export_encoder import main

if __name__ == "__main__":
    sys.exit(main())
