"""LLM training-step throughput and MFU: a Megatron-Core GPTModel with Qwen2.5 shapes, random weights.

    python tools/bench_llm.py --model qwen2.5-0.5b --seq-length 4096 --samples-per-row 4 [--steps 10]

One packed row of `--seq-length` tokens holding `--samples-per-row` samples per step
(forward, backward, no optimizer), bf16 on CUDA / fp32 on CPU. Prints tokens/s, model
TFLOP/s (counted FLOPs, 3x forward) and MFU where the device's peak is known.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import viq_megatron  # noqa: E402,F401

SHAPES = {  # Qwen2.5 sizes (hidden, layers, heads, kv groups, ffn, vocab)
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064),
    "tiny": (256, 4, 4, 2, 768, 4096),
}


def main() -> None:
    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    from viq_megatron.config import LLMArch, ParallelConfig
    from viq_megatron.models.flops import llm_forward_flops, peak_flops
    from viq_megatron.models.llm import build_llm
    from viq_megatron.runtime.distributed import initialize, shutdown

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--samples-per-row", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    h, layers, heads, groups, ffn, vocab = SHAPES[args.model]
    arch = LLMArch(h, layers, heads, groups, ffn, vocab, rotary_base=1e6, qkv_bias=True, tie_word_embeddings=False,
                   max_sequence_length=args.seq_length, model_type="qwen2")
    initialize(ParallelConfig(), seed=0)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_llm(arch, 1, dtype, "local")
    model = model.cuda() if cuda else model
    device = torch.device("cuda" if cuda else "cpu")
    lengths = [args.seq_length // args.samples_per_row] * args.samples_per_row
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    tokens = torch.randint(0, vocab, (1, sum(lengths)), device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)[None]

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=tokens, position_ids=positions, attention_mask=None, labels=tokens,
                     packed_seq_params=packed)
        loss.float().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()
    seconds = statistics.median(step() for _ in range(args.steps))
    flops = 3 * llm_forward_flops(arch, lengths) / seconds
    peak = peak_flops(device)
    memory = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    print(f"{args.model}: {sum(lengths)} tokens/row in {args.samples_per_row} samples, {str(dtype)[6:]}, "
          f"{device.type}: {seconds * 1e3:.1f} ms/step, {sum(lengths) / seconds:,.0f} tokens/s, "
          f"{flops / 1e12:.1f} TFLOP/s" + (f", MFU {flops / peak:.1%}" if peak else "") + memory)
    shutdown()


if __name__ == "__main__":
    main()
