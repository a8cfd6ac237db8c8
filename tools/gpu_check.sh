#!/usr/bin/env bash
# GPU check for one H100/H200, under 8 minutes: the CUDA/NCCL path in bf16.
#   bash tools/gpu_check.sh [OUT_DIR]     (default docs/gpu_check/<date>; the log is gpu_check.log)
# 1. the test suite's CUDA-capable parts (the CPU compatibility layer must stay off), with the
#    GPU parity checks: fused varlen attention vs the per-sequence path, a sequence alone vs
#    packed (bitwise), Megatron-Core's fused cross-entropy and SwiGLU;
# 2. the main job on the SO400M-sized encoder in bf16: throughput, TFLOP/s, MFU;
# 3. packed native-resolution vs padded and length-bucketed padded batches, bf16;
# 4. the LLM training step (Qwen2.5-0.5B / 1.5B shapes, packed 4K rows): tokens/s, MFU, host
#    syncs and operators per step, beside the step with Megatron-Core's per-sample RoPE;
#    the discrete vs continuous speedup (frozen and trained SO400M encoder) at 4K and 16K rows,
#    beside the cached-features baseline (0.5B);
# 5. a seconds-long stage 1 in bf16 through the training loop (DDP, optimizer, checkpoints);
# 6. with Transformer Engine installed (clusters; not the lent GPU): the same encode with TE
#    layers; TE vs local parity on the LLM and FP8 (delayed, current) vs bf16 step throughput.
# Uses the python3 that holds a CUDA torch. A machine without megatron-core takes it
# from .whl/ (pip download megatron-core==0.19.2 for its Python; see README).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-docs/gpu_check/$(date +%F)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c 'import megatron.core' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/viq_site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/viq_site"
fi
status=0
step() { echo; echo "== $1"; shift; "$@" 2>&1 | tee -a "$out/gpu_check.log"; local rc=${PIPESTATUS[0]}; [[ $rc == 0 ]] || status=$rc; }

step "device" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step "versions" python3 -c 'import viq_megatron, torch, megatron.core as m; print("torch", torch.__version__, "cuda", torch.version.cuda, "megatron-core", m.__version__, "extras", viq_megatron.GPU_EXTRAS)'
step "tests (CUDA-capable parts)" python3 -m pytest -q -p no:cacheprovider tests
step "encode, SO400M-sized encoder, bf16, local layers" \
    torchrun --nproc-per-node 1 -m viq_megatron.encode --config examples/encoder_so400m_gpu.yaml model.transformer_impl=local
step "packed vs padded, SO400M-sized encoder, bf16" \
    python3 tools/bench_encoder.py --config examples/encoder_so400m_gpu.yaml --repeats 5 model.transformer_impl=local
step "LLM step, Qwen2.5-0.5B shape, 4096 tokens in 4 samples, bf16" \
    python3 tools/bench_llm.py --model qwen2.5-0.5b --seq-length 4096 --samples-per-row 4 --steps 10
step "LLM step, Qwen2.5-1.5B shape, 4096 tokens in 4 samples, bf16" \
    python3 tools/bench_llm.py --model qwen2.5-1.5b --seq-length 4096 --samples-per-row 4 --steps 10
# Every path holds its own LLM and Adam state (18 bytes per parameter): four paths of the 1.5B
# LLM with 16K-token activations would not fit; it runs without the cached-features path.
for llm in 0.5b 1.5b; do
    for encoder in frozen trained; do
        step "discrete vs cached vs continuous through the Trainer, SO400M ($encoder) + Qwen2.5-$llm at full size, 4K and 16K rows, bf16" \
            python3 tools/bench_speedup.py --llm $llm --width-scale 1 --depth-scale 1 --seq-lengths 4096 16384 \
            --encoder $encoder --steps 6 --num-workers 4 $([[ $llm == 1.5b ]] && echo --no-cached)
    done
done
step "stage 1 smoke, bf16, CUDA/NCCL" \
    torchrun --nproc-per-node 1 -m viq_megatron.train --config examples/stage1_smoke.yaml \
    model.params_dtype=bfloat16 train.output_dir=/tmp/viq_stage1_smoke
if python3 -c 'import transformer_engine.pytorch' 2>/dev/null; then
    step "encode, SO400M-sized encoder, bf16, Transformer Engine layers" \
        torchrun --nproc-per-node 1 -m viq_megatron.encode --config examples/encoder_so400m_gpu.yaml model.transformer_impl=transformer_engine
    step "LLM step, Qwen2.5-1.5B shape, local vs TE bf16 vs TE FP8 (delayed, current), parity first" \
        python3 tools/bench_llm.py --model qwen2.5-1.5b --seq-length 4096 --samples-per-row 4 --steps 10 --compare-te
else
    echo; echo "== Transformer Engine not installed here: TE steps skipped"
fi
exit $status
