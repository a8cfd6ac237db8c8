"""Codebook usage beside the PCA-5 cap of the same images: viq_megatron/cli/codebook_cap.py (viq-codebook-cap)."""

import sys

from viq_megatron.cli.codebook_cap import main

if __name__ == "__main__":
    sys.exit(main())
