"""Images -> ViQ codes (or encoder features) -> offline token files: viq_megatron/cli/preprocess.py (viq-preprocess)."""

import sys

from viq_megatron.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
