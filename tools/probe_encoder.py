"""What a tokenizer's representations know about a scene: viq_megatron/cli/probe_encoder.py (viq-probe-encoder)."""

import sys

from viq_megatron.cli.probe_encoder import main

if __name__ == "__main__":
    sys.exit(main())
