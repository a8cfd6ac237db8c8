"""A SigLIP / SigLIP2 vision tower -> our encoder directory: viq_megatron/cli/convert_vision.py (viq-convert-vision)."""

import sys

from viq_megatron.cli.convert_vision import main

if __name__ == "__main__":
    sys.exit(main())
