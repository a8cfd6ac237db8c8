"""Pick a parallel layout and estimate memory and step time from FLOP and byte counts.

    python tools/plan_layout.py                                   # the paper's configurations
    python tools/plan_layout.py --gpus 16 --seq 8192 --llm qwen2.5-7b --encoder so400m --path continuous

For each configuration it tries every tensor x pipeline split of the GPUs (tensor parallel
within a node, dividing the LLM's KV groups; pipeline dividing its layers), keeps those whose
busiest GPU fits in memory, and prints the fastest. The model of a step:

- compute: counted matmul FLOPs (forward x3) at `--mfu` of the GPU's bf16 peak; the
  continuous path adds the encoder on the first pipeline stage (frozen: forward only);
- tensor parallel: 4 all-reduces of the activations per layer (2 forward, 2 backward) at
  `--nvlink-gbs`; pipeline: the 1F1B bubble, (stages - 1) extra stage-times per step;
- data parallel: the gradients' reduce-scatter + the parameters' all-gather at `--network-gbs`
  per GPU, overlapped with the backward pass (counted only where it exceeds it);
- memory on the busiest GPU (the first pipeline stage, which keeps `stages` micro-batches of
  activations in flight; the last stage's logits where larger): bf16 weights, fp32 gradients,
  fp32 Adam state (master, m, v) sharded over data-parallel ranks (distributed optimizer),
  activations per token and layer as Megatron-Core keeps them with flash attention and
  without recomputation.
Estimates, not measurements: `tools/gpu_check.sh` measures the real step on one GPU.
"""

from __future__ import annotations

import argparse

from viq_megatron.benchmarks.layout import ENCODERS, LLMS, plan


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", nargs="+", default=list(LLMS), choices=list(LLMS))
    parser.add_argument("--encoder", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--seq", nargs="+", type=int, default=[4096, 8192, 16384], help="packed row length")
    parser.add_argument(
        "--path",
        nargs="+",
        default=["discrete", "continuous"],
        choices=["discrete", "continuous", "continuous-trained"],
        help="continuous: frozen encoder; continuous-trained: the encoder trains too",
    )
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=8, help="packed rows per data-parallel rank per step")
    parser.add_argument("--visual-fraction", type=float, default=0.5, help="share of tokens that are visual")
    parser.add_argument("--image-patches", type=int, default=1024, help="patches per image (512x512 at patch 16)")
    parser.add_argument("--memory-gib", type=float, default=80.0)
    parser.add_argument("--overhead-gib", type=float, default=6.0, help="CUDA context, allocator slack, buffers")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM)")
    parser.add_argument("--mfu", type=float, default=0.4, help="achieved share of the peak (TE layers)")
    parser.add_argument("--nvlink-gbs", type=float, default=300.0, help="all-reduce bus bandwidth, GB/s")
    parser.add_argument("--network-gbs", type=float, default=40.0, help="inter-node bandwidth per GPU, GB/s")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    print("| LLM | encoder | tokens/row | path | TP x PP x DP | GiB/GPU | step s | tokens/s/GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for llm_name in args.llm:
        for enc_name in args.encoder:
            for seq in args.seq:
                for path in args.path:
                    encoder = None if path == "discrete" else ENCODERS[enc_name]
                    best = plan(
                        LLMS[llm_name],
                        encoder,
                        path == "continuous-trained",
                        seq,
                        args.gpus,
                        args.micro_batches,
                        args.visual_fraction,
                        args.image_patches,
                        args,
                    )
                    layout = (
                        "does not fit"
                        if best is None
                        else f"{best.tp} x {best.pp} x {best.dp} | {best.memory_gib:.0f} | {best.step_s:.2f} | "
                        f"{best.tokens_per_s_per_gpu:,.0f}"
                    )
                    print(f"| {llm_name} | {enc_name if encoder else '-'} | {seq} | {path} | {layout} |")
    return 0
