"""LLM training-step throughput and MFU: a Megatron-Core GPTModel with Qwen2.5 shapes, random weights.

    python tools/bench_llm.py --model qwen2.5-0.5b --seq-length 4096 --samples-per-row 4 [--steps 10]
    python tools/bench_llm.py --model qwen2.5-0.5b --seq-length 4096 --compare-te   # GPU with TE

One packed row of `--seq-length` tokens holding `--samples-per-row` samples per step
(forward, backward, no optimizer), bf16 on CUDA / fp32 on CPU, as training runs it: RoPE
from per-token angles in one pass, the fused attention and (on CUDA) Megatron-Core's fused
cross-entropy and SwiGLU. Prints tokens/s, model TFLOP/s (counted FLOPs, 3x forward), MFU
where the device's peak is known, host synchronisations and operators per step, and the
same step with Megatron-Core's per-sample packed RoPE (the path before) for comparison.
`--compare-te` times local layers, TE layers in bf16 and TE in FP8 (delayed and current
scaling) side by side in one process, after checking that TE layers given the local
model's weights compute the same loss (bf16 tolerance).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import viq_megatron  # noqa: E402

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
    from viq_megatron.models.llm import build_llm, packed_rows
    from viq_megatron.models.specs import te_layer_names
    from viq_megatron.runtime.distributed import initialize, shutdown

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--samples-per-row", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compare-te", action="store_true", help="also TE layers in bf16 and FP8 (needs TE and CUDA)")
    args = parser.parse_args()
    if args.compare_te and not viq_megatron.GPU_EXTRAS["transformer_engine"]:
        raise SystemExit("error: --compare-te needs Transformer Engine, which is not installed or not usable here")
    h, layers, heads, groups, ffn, vocab = SHAPES[args.model]
    arch = LLMArch(h, layers, heads, groups, ffn, vocab, rotary_base=1e6, qkv_bias=True, tie_word_embeddings=False,
                   max_sequence_length=args.seq_length, model_type="qwen2")
    initialize(ParallelConfig(), seed=0)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device("cuda" if cuda else "cpu")
    lengths = [args.seq_length // args.samples_per_row] * args.samples_per_row
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    megatron_rope = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                                    max_seqlen_kv=max(lengths))
    tokens = torch.randint(0, vocab, (1, sum(lengths)), device=device)
    positions = torch.cat([torch.arange(n) for n in lengths])

    def loss_of(model, packed=None) -> torch.Tensor:
        packed = packed or packed_rows(model, bounds, positions)
        return model(input_ids=tokens, position_ids=positions.to(device)[None], attention_mask=None, labels=tokens,
                     packed_seq_params=packed).float().mean()

    def time_step(model, packed=None) -> float:
        def step() -> float:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss_of(model, packed).backward()
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        step()
        return statistics.median(step() for _ in range(args.steps))

    def syncs_and_operators(model, packed=None) -> str:
        """Host synchronisations (CUDA's sync debug mode) and operators dispatched in one step."""
        import warnings

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss_of(model, packed).backward()
        operators = sum(1 for e in prof.events() if e.name.startswith("aten::"))
        if not cuda:
            return f"{operators} operators/step"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss_of(model, packed).backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return f"{sum('synchroniz' in str(w.message) for w in caught)} host syncs/step, {operators} operators/step"

    def report(name: str, seconds: float, baseline: float | None = None) -> None:
        flops = 3 * llm_forward_flops(arch, lengths) / seconds
        peak = peak_flops(device)
        memory = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        ratio = f", {baseline / seconds:.2f}x local bf16" if baseline else ""
        print(f"{args.model} {name}: {sum(lengths)} tokens/row in {args.samples_per_row} samples, {str(dtype)[6:]}, "
              f"{device.type}: {seconds * 1e3:.1f} ms/step, {sum(lengths) / seconds:,.0f} tokens/s, "
              f"{flops / 1e12:.1f} TFLOP/s" + (f", MFU {flops / peak:.1%}" if peak else "") + memory + ratio)

    local = build_llm(arch, 1, dtype, "local", fused=cuda)
    baseline = time_step(local)
    report(f"local layers{', fused CE + SwiGLU' if cuda else ''}", baseline)
    print(f"  {syncs_and_operators(local)}")
    report("local layers, Megatron-Core's per-sample packed RoPE (before)", time_step(local, megatron_rope))
    print(f"  {syncs_and_operators(local, megatron_rope)}")
    if args.compare_te:
        with torch.no_grad():
            reference = loss_of(local).item()
        weights = te_layer_names(local.state_dict())
        del local
        for fp8 in ("off", "delayed", "current"):
            te = build_llm(arch, 1, dtype, "transformer_engine", fp8)
            missing, unexpected = te.load_state_dict(weights, strict=False)
            if [k for k in missing if not k.endswith("_extra_state")] or unexpected:
                raise SystemExit(f"error: local -> TE weight names: missing {missing[:3]}, unexpected {unexpected[:3]}")
            if fp8 == "off":
                with torch.no_grad():
                    loss = loss_of(te).item()
                print(f"TE vs local loss, same weights, bf16: {loss:.5f} vs {reference:.5f} "
                      f"(relative difference {abs(loss - reference) / abs(reference):.1e})")
            report(f"TE layers, fp8 {fp8}", time_step(te), baseline)
            del te
    shutdown()


if __name__ == "__main__":
    main()
