"""Discrete (offline ViQ codes) vs continuous (encoder every step) multimodal training, side by side.

    python tools/bench_speedup.py [--llm 0.5b 1.5b] [--seq-lengths 512 1024] [--encoder frozen|trained]

One process, one machine, the same LLM weights and packed rows for every path, timed
alternately (median of --steps training steps each: forward, backward, AdamW):
- continuous: JPEG decode + native-resolution resize + encoder + projector + LLM;
- discrete:   offline codes + code embedder (ViQ head's per-patch decoding) + projector + LLM;
- ideal:      the visual embeddings precomputed; the LLM step alone.
Prints the achieved speedup (continuous / discrete) and the ideal one (continuous / ideal).

Proportions follow the paper's setting: a SigLIP2-SO400M encoder with Qwen2.5-0.5B or
1.5B, 16x16 patches, one LLM input per patch, images taking 3/4 of each sequence, 4
samples per packed row. On CPU every width and depth is divided by --scale (default 8
for widths, 4 for depths), which keeps the encoder/LLM FLOP ratio; `--scale 1` on a GPU
runs the real sizes.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import viq_megatron  # noqa: E402,F401

# (hidden, layers, heads, kv groups, ffn, vocab)
LLMS = {"0.5b": (896, 24, 14, 2, 4864, 151936), "1.5b": (1536, 28, 12, 2, 8960, 151936)}
SO400M = (1152, 27, 16, 4304)


def scaled(value: int, divisor: int, multiple: int = 1) -> int:
    return max(multiple, round(value / divisor / multiple) * multiple)


def main() -> None:
    import numpy as np
    import torch
    from PIL import Image

    from viq_megatron.config import EncoderConfig, HeadConfig, ImageConfig, LLMArch, ParallelConfig
    from viq_megatron.data.embedded import shipped_photos
    from viq_megatron.data.images import load_native_image
    from viq_megatron.data.multimodal import EncodedSample, pack_samples
    from viq_megatron.models.llm import build_llm
    from viq_megatron.models.multimodal import (CodeVisualInput, EncoderVisualInput, Projector, VisionLanguageModel,
                                                VisualOutput)
    from viq_megatron.models.viq_head import ViQHead
    from viq_megatron.models.vit import NativeResolutionViT, encoder_transformer_config
    from viq_megatron.runtime.distributed import initialize, shutdown

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", nargs="+", choices=sorted(LLMS), default=["0.5b", "1.5b"])
    parser.add_argument("--seq-lengths", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--encoder", choices=["frozen", "trained"], default="frozen")
    parser.add_argument("--width-scale", type=int, default=8)
    parser.add_argument("--depth-scale", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    initialize(ParallelConfig(), seed=0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    w, d = args.width_scale, args.depth_scale
    enc_cfg = EncoderConfig(hidden_size=scaled(SO400M[0], w, 16), num_layers=scaled(SO400M[1], d),
                            num_attention_heads=4, ffn_hidden_size=scaled(SO400M[3], w, 16))
    encoder = NativeResolutionViT(enc_cfg, encoder_transformer_config(enc_cfg, 1, dtype, "local"), "local")
    encoder = encoder.to(device, dtype).requires_grad_(args.encoder == "trained")
    head_cfg = HeadConfig(pre_layers=0, subtoken_size=scaled(256, w, 4), subtoken_layers=1,
                          subtoken_ffn_size=scaled(2048, w, 16), post_blocks=2)
    head = ViQHead(head_cfg, enc_cfg, 1, dtype, "local").to(device).requires_grad_(False)
    photos = shipped_photos()
    print(f"encoder {enc_cfg.hidden_size} wide x {enc_cfg.num_layers} layers (SO400M / {w}, / {d}); "
          f"{str(dtype)[6:]}, {device.type}; encoder {args.encoder}; median of {args.steps} steps")
    print("| LLM | seq length | continuous s/step | discrete s/step | ideal s/step | speedup | ideal speedup | "
          "discrete vs ideal |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.llm:
            h, layers, heads, groups, ffn, vocab = LLMS[name]
            arch = LLMArch(hidden_size=scaled(h, w, 32), num_layers=scaled(layers, d), num_attention_heads=2,
                           num_query_groups=1, ffn_hidden_size=scaled(ffn, w, 16), vocab_size=scaled(vocab, w, 128),
                           max_sequence_length=max(args.seq_lengths), model_type="qwen2", qkv_bias=True,
                           tie_word_embeddings=False)
            llm = build_llm(arch, 1, dtype, "local")
            projector = Projector(enc_cfg.hidden_size, arch.hidden_size, dtype).to(device)
            for length in args.seq_lengths:
                per_sample = length // 4
                patches = per_sample * 3 // 4
                side = int(math.sqrt(patches)) * 16
                rules = ImageConfig(min_pixels=side * side, max_pixels=side * side)
                paths = []
                for k in range(4):  # real JPEGs on disk, decoded every continuous step
                    path = Path(tmp) / f"{name}_{length}_{k}.jpg"
                    Image.open(photos[k % len(photos)]).convert("RGB").resize((side + 37, side + 11)).save(path)
                    paths.append(path)
                images = [load_native_image(p, rules, 16) for p in paths]
                rng = np.random.default_rng(0)

                def sample(image, codes=None):
                    text = per_sample - image.num_patches
                    ids = rng.integers(0, arch.vocab_size, per_sample).tolist()
                    slots = list(range(text // 2, text // 2 + image.num_patches))
                    flags = [i >= slots[-1] for i in range(per_sample)]  # the answer follows the image
                    return EncodedSample(image.source, ids, flags, slots, [image], [], [codes] if codes is not None else [])

                code_rows = [torch.from_numpy(rng.integers(0, 15360, (im.num_patches, 4))) for im in images]
                template = pack_samples([sample(im, c) for im, c in zip(images, code_rows)])
                precomputed = torch.randn(len(template.visual_positions), arch.hidden_size, dtype=dtype,
                                          device=device)

                class Precomputed(torch.nn.Module):
                    def forward(self, batch):
                        return VisualOutput(precomputed)

                paths_models = {
                    "continuous": VisionLanguageModel(EncoderVisualInput(encoder, projector), llm),
                    "discrete": VisionLanguageModel(CodeVisualInput(head, projector), llm),
                    "ideal": VisionLanguageModel(Precomputed(), llm),
                }

                def batch_for(path_name):
                    if path_name == "continuous":  # decode + resize + patchify every step
                        return pack_samples([sample(load_native_image(p, rules, 16)) for p in paths])
                    return template

                optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                              for n, m in paths_models.items()}
                times = {n: [] for n in paths_models}
                for repeat in range(args.steps + 1):
                    for path_name, model in paths_models.items():
                        if cuda:
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        batch = batch_for(path_name)
                        loss = (model(batch).token_losses * batch.loss_mask.to(device)).sum() / batch.loss_mask.sum()
                        loss.backward()
                        optimizers[path_name].step()
                        optimizers[path_name].zero_grad(set_to_none=True)
                        if cuda:
                            torch.cuda.synchronize()
                        if repeat:  # the first round warms up
                            times[path_name].append(time.perf_counter() - start)
                t = {n: statistics.median(v) for n, v in times.items()}
                print(f"| {name} | {length} | {t['continuous']:.3f} | {t['discrete']:.3f} | {t['ideal']:.3f} | "
                      f"{t['continuous'] / t['discrete']:.2f}x | {t['continuous'] / t['ideal']:.2f}x | "
                      f"{t['discrete'] / t['ideal'] - 1:+.1%} |")
    shutdown()


if __name__ == "__main__":
    main()
