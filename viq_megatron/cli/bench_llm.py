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
import time
import warnings

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch.profiler import ProfilerActivity, profile

import viq_megatron
from viq_megatron.config import LLMArch, ParallelConfig
from viq_megatron.models.flops import llm_forward_flops, peak_flops
from viq_megatron.models.llm import build_llm, packed_rows
from viq_megatron.models.specs import te_layer_names
from viq_megatron.runtime.distributed import initialize, shutdown

SHAPES = {  # Qwen2.5 sizes (hidden, layers, heads, kv groups, ffn, vocab)
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064),
    "tiny": (256, 4, 4, 2, 768, 4096),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--samples-per-row", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compare-te", action="store_true", help="also TE layers in bf16 and FP8 (needs TE and CUDA)")
    args = parser.parse_args(argv)
    if args.compare_te and not viq_megatron.GPU_EXTRAS["transformer_engine"]:
        raise SystemExit("error: --compare-te needs Transformer Engine, which is not installed or not usable here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    h, layers, heads, groups, ffn, vocab = SHAPES[args.model]
    arch = LLMArch(
        h,
        layers,
        heads,
        groups,
        ffn,
        vocab,
        rotary_base=1e6,
        qkv_bias=True,
        tie_word_embeddings=False,
        max_sequence_length=args.seq_length,
        model_type="qwen2",
    )
    initialize(ParallelConfig(), seed=0)
    bench = StepBench(args, arch)
    local = build_llm(arch, 1, bench.dtype, "local", fused=bench.cuda)
    baseline = bench.time_step(local)
    bench.report(f"local layers{', fused CE + SwiGLU' if bench.cuda else ''}", baseline)
    print(f"  {bench.syncs_and_operators(local)}")
    bench.report(
        "local layers, Megatron-Core's per-sample packed RoPE (before)", bench.time_step(local, bench.megatron_rope)
    )
    print(f"  {bench.syncs_and_operators(local, bench.megatron_rope)}")
    if args.compare_te:
        with torch.no_grad():
            reference = bench.loss_of(local).item()
        weights = te_layer_names(local.state_dict())
        del local  # its memory is the TE models'
        compare_te(bench, weights, reference, baseline)
    shutdown()
    return 0


class StepBench:
    """One packed row of random tokens (`--samples-per-row` samples), and the measurements of a
    training step (forward + backward, no optimizer) on it."""

    def __init__(self, args: argparse.Namespace, arch: LLMArch):
        self.args, self.arch = args, arch
        self.cuda = torch.cuda.is_available()
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.lengths = [args.seq_length // args.samples_per_row] * args.samples_per_row
        self.bounds = torch.tensor([0] + self.lengths).cumsum(0).tolist()
        cu = torch.tensor(self.bounds, dtype=torch.int32, device=self.device)
        self.megatron_rope = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=max(self.lengths),
            max_seqlen_kv=max(self.lengths),
        )
        self.tokens = torch.randint(0, arch.vocab_size, (1, sum(self.lengths)), device=self.device)
        self.positions = torch.cat([torch.arange(n) for n in self.lengths])

    def loss_of(self, model, packed=None) -> torch.Tensor:
        packed = packed or packed_rows(model, self.bounds, self.positions)
        return (
            model(
                input_ids=self.tokens,
                position_ids=self.positions.to(self.device)[None],
                attention_mask=None,
                labels=self.tokens,
                packed_seq_params=packed,
            )
            .float()
            .mean()
        )

    def time_step(self, model, packed=None) -> float:
        """The median seconds of `--steps` steps, after one warm-up step."""

        def step() -> float:
            if self.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.loss_of(model, packed).backward()
            if self.cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        step()
        return statistics.median(step() for _ in range(self.args.steps))

    def syncs_and_operators(self, model, packed=None) -> str:
        """Host synchronisations (CUDA's sync debug mode) and operators dispatched in one step."""
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.loss_of(model, packed).backward()
        operators = sum(1 for e in prof.events() if e.name.startswith("aten::"))
        if not self.cuda:
            return f"{operators} operators/step"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.loss_of(model, packed).backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return f"{sum('synchroniz' in str(w.message) for w in caught)} host syncs/step, {operators} operators/step"

    def report(self, name: str, seconds: float, baseline: float | None = None) -> None:
        tokens = sum(self.lengths)
        flops = 3 * llm_forward_flops(self.arch, self.lengths) / seconds
        peak = peak_flops(self.device)
        memory = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if self.cuda else ""
        ratio = f", {baseline / seconds:.2f}x local bf16" if baseline else ""
        print(
            f"{self.args.model} {name}: {tokens} tokens/row in {self.args.samples_per_row} samples, "
            f"{str(self.dtype)[6:]}, {self.device.type}: {seconds * 1e3:.1f} ms/step, {tokens / seconds:,.0f} "
            f"tokens/s, {flops / 1e12:.1f} TFLOP/s" + (f", MFU {flops / peak:.1%}" if peak else "") + memory + ratio
        )


def compare_te(bench: StepBench, weights: dict, reference: float, baseline: float) -> None:
    """TE layers given the local model's `weights`: their loss against the local one's
    (`reference`, bf16), then their step time in bf16 and FP8 (delayed and current scaling)."""
    for fp8 in ("off", "delayed", "current"):
        te = build_llm(bench.arch, 1, bench.dtype, "transformer_engine", fp8)
        missing, unexpected = te.load_state_dict(weights, strict=False)
        if [k for k in missing if not k.endswith("_extra_state")] or unexpected:
            raise SystemExit(f"error: local -> TE weight names: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if fp8 == "off":
            with torch.no_grad():
                loss = bench.loss_of(te).item()
            print(
                f"TE vs local loss, same weights, bf16: {loss:.5f} vs {reference:.5f} "
                f"(relative difference {abs(loss - reference) / abs(reference):.1e})"
            )
        bench.report(f"TE layers, fp8 {fp8}", bench.time_step(te), baseline)
        del te
