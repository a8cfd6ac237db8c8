"""Reconstruction PSNR / SSIM of a ViQTokenizer: viq_megatron/cli/eval_reconstruction.py (viq-eval-reconstruction)."""

import sys

from viq_megatron.cli.eval_reconstruction import main

if __name__ == "__main__":
    sys.exit(main())
