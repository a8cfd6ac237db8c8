"""Discrete (offline ViQ codes) vs continuous (encoder every step) multimodal training, timed
by the `Trainer` itself.

    python tools/bench_speedup.py [--llm 0.5b 1.5b] [--seq-lengths 512 1024] [--steps 20]
                                  [--encoder frozen trained] [--no-cached] [--profile DIR] [--out DIR]

For each LLM and row length, one process builds one real `Trainer` per path (its DataLoader
workers, Megatron-Core DDP, optimizer and schedule, the loop a user runs), all on the same
packed rows, and the paths take turns step by step (so that a machine's drift reaches every
path alike), `--warmup` steps each and then `--steps` timed ones. Before each step the bench
collects garbage and pauses `--pause` seconds, untimed, so the previous path's workers finish
refilling their queue (on a GPU node they have cores of their own; on 2 CPU cores they would
slow the next path's step):
- continuous (encoder frozen, and trained): images decoded in the workers, encoder +
  projector + LLM; the strong baseline: its rows are built off the step;
- discrete: offline codes (tools/preprocess_images.py's token files, read by the same
  workers), the ViQ head's per-patch decoding + projector + LLM;
- cached (with the frozen encoder): the frozen encoder's tokens stored offline
  (preprocess_images.py --features, bf16) + projector + LLM: the fair rival of the codes, which
  also skips the encoder, at 2 * width bytes per patch against the codes' 16;
- ideal: the same rows with the visual embeddings given (no visual compute): the LLM step alone.
It prints each path's median step time and data wait, the achieved speedup (continuous /
discrete) beside the measured ideal (continuous / ideal) and the FLOP ideal (counted FLOPs of
the continuous step / the LLM step), and the bytes per patch each offline path stores (at the
bench's width, and at SO400M's).

Proportions: a SigLIP2-SO400M encoder with Qwen2.5-0.5B or 1.5B, 16x16 patches, one LLM
input per patch, 4 samples per row, images 3/4 of each. On CPU every width is divided by
--width-scale and the LLM's depth by --depth-scale; the vocabulary, the encoder's depth and
the head's post-blocks are chosen (`matched`) so that the LM head's share of the LLM's FLOPs
and the encoder's and code embedding's FLOPs per LLM FLOP are the real shapes' (attention's
share grows as widths shrink). Before timing anything the bench checks, on the packed rows
themselves, that images fill 3/4 of the rows (within 2 points), and that the encoder/LLM FLOP
ratio and the LM head's share are within 10% of the real shapes' on the same rows.
`--width-scale 1 --depth-scale 1` on a GPU runs the real sizes (bf16).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import viq_megatron  # noqa: E402,F401  (hides a broken Transformer Engine before Megatron-Core loads)

# (hidden, layers, heads, kv groups, ffn, vocab)
LLMS = {"0.5b": (896, 24, 14, 2, 4864, 151936), "1.5b": (1536, 28, 12, 2, 8960, 151936)}
SO400M = (1152, 27, 16, 4304)  # hidden, layers, heads, ffn
SAMPLES_PER_ROW, VISUAL_SHARE, PATCH = 4, 0.75, 16
WORDS = ("red green blue yellow circle square triangle left right top bottom small large one two three "
         "the a of in on is with and near far above below beside scene picture shows there").split()


def scaled(value: int, divisor: int, multiple: int = 1) -> int:
    return max(multiple, round(value / divisor / multiple) * multiple)


def shapes(llm: str, w: int, d: int) -> dict[str, dict]:
    """Override values of model.encoder, model.head and model.llm.arch at 1/w width and 1/d
    depth (before `matched`)."""
    h, layers, heads, groups, ffn, vocab = LLMS[llm]
    head = dict(pre_layers=3, subtoken_size=256, subtoken_layers=3, subtoken_ffn_size=4096,  # the GPU example's
                post_blocks=2)
    if w == d == 1:
        encoder = dict(hidden_size=SO400M[0], num_layers=SO400M[1], num_attention_heads=SO400M[2],
                       ffn_hidden_size=SO400M[3])
        arch = dict(hidden_size=h, num_layers=layers, num_attention_heads=heads, num_query_groups=groups,
                    ffn_hidden_size=ffn, vocab_size=vocab)
    else:  # the head's blocks before the quantizer only write the codes: one of each
        encoder = dict(hidden_size=scaled(SO400M[0], w, 16), num_layers=scaled(SO400M[1], d),
                       num_attention_heads=4, ffn_hidden_size=scaled(SO400M[3], w, 16))
        head = dict(head, pre_layers=1, subtoken_size=scaled(256, w, 4), subtoken_layers=1,
                    subtoken_ffn_size=scaled(4096, w, 16))
        arch = dict(hidden_size=scaled(h, w, 32), num_layers=scaled(layers, d), num_attention_heads=2,
                    num_query_groups=1, ffn_hidden_size=scaled(ffn, w, 16), vocab_size=vocab)
    arch.update(qkv_bias=True, tie_word_embeddings=False, model_type="qwen2")
    return {"encoder": encoder, "head": {**head, "quantizer": "fsq"}, "arch": arch}


def flop_ratios(shape: dict[str, dict], seqlens: list[int], image_lengths: list[int]) -> dict[str, float]:
    """Forward FLOPs over the LLM's, on rows of `seqlens` tokens holding images of
    `image_lengths` patches: the encoder's, the discrete path's code embedding's, the LM head's."""
    from viq_megatron.config import EncoderConfig, HeadConfig, LLMArch
    from viq_megatron.models.flops import code_embedding_forward_flops, llm_forward_flops, vit_forward_flops

    encoder, arch = EncoderConfig(**shape["encoder"]), LLMArch(**shape["arch"])
    llm = llm_forward_flops(arch, seqlens)
    return {"encoder_per_llm": vit_forward_flops(encoder, image_lengths) / llm,
            "code_embedding_per_llm": code_embedding_forward_flops(
                HeadConfig(**shape["head"]), encoder, arch.hidden_size, sum(image_lengths)) / llm,
            "lm_head_share": 2 * sum(seqlens) * arch.hidden_size * arch.vocab_size / llm}


def matched(shape: dict[str, dict], real: dict[str, dict], seqlens: list[int], image_lengths: list[int]) -> None:
    """Sets the scaled vocabulary, encoder depth and head post-blocks so that the LM head's
    share and the encoder's and code embedding's FLOPs per LLM FLOP are the real shapes' on
    these rows (the nearest depth and block count; shrinking widths grows attention's share)."""
    target = flop_ratios(real, seqlens, image_lengths)
    arch = shape["arch"]
    current = flop_ratios(shape, seqlens, image_lengths)["lm_head_share"]  # = kV / (body + kV): solve for V
    share = target["lm_head_share"]
    arch["vocab_size"] = scaled(share / (1 - share) * (1 - current) / (current / arch["vocab_size"]), 1, 128)
    for part, key, ratio in (("encoder", "num_layers", "encoder_per_llm"),
                             ("head", "post_blocks", "code_embedding_per_llm")):
        shape[part][key] = min(range(0 if part == "head" else 1, 2 * real[part][key] + 1), key=lambda n: abs(
            flop_ratios({**shape, part: {**shape[part], key: n}}, seqlens, image_lengths)[ratio] - target[ratio]))


def grid(patches: int) -> tuple[int, int]:
    """(rows, columns) of patches: the most square grid of about `patches` (never more)."""
    best = None
    for n in range(patches, max(patches - 4, 1), -1):
        rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
        if best is None or rows / (n // rows) > best[0] / best[1] + 0.2:
            best = (rows, n // rows)
    return best


def write_data(folder: Path, length: int, text_tokenizer, count: int) -> tuple[Path, int]:
    """`count` conversations of one image each, laid out so that `SAMPLES_PER_ROW` fill a row
    of `length` tokens with images taking `VISUAL_SHARE` of it; (their JSONL, pixels per image)."""
    from PIL import Image

    from viq_megatron.data.embedded import shipped_photos
    from viq_megatron.data.text import Turn, tokenize_conversation

    per_sample = length // SAMPLES_PER_ROW
    rows, columns = grid(round(per_sample * VISUAL_SHARE))
    text_budget = per_sample - rows * columns
    photos = shipped_photos()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(count):
        image = f"images/{k}.jpg"
        photo = Image.open(photos[k % len(photos)]).convert("RGB")
        photo.resize((columns * PATCH, rows * PATCH)).save(folder / image, quality=90)
        words = [WORDS[(k * 7 + i) % len(WORDS)] for i in range(text_budget)]
        while True:  # the longest answer that fits the sample's text budget
            turns = [Turn("user", "<image>\nDescribe the picture."), Turn("assistant", " ".join(words))]
            if tokenize_conversation(text_tokenizer, turns).num_text_tokens() <= text_budget:
                break
            if not words:
                raise SystemExit(f"error: --seq-lengths {length}: samples of {per_sample} tokens leave {text_budget} "
                                 "for text, fewer than the conversation needs without an answer")
            words.pop()
        lines.append({"id": k, "image": image, "conversations": [
            {"from": "human", "value": turns[0].text}, {"from": "gpt", "value": turns[1].text}]})
    path = folder / f"data_{length}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, rows * columns * PATCH * PATCH


def check_proportions(shape: dict[str, dict], real: dict[str, dict], rows: list) -> dict:
    """The visual share and `flop_ratios` of the packed `rows`, at the bench's and the real shapes;
    raises if the rows' visual share, the encoder/LLM ratio or the LM head share drift from the
    paper's setting (the code embedding's ratio is reported: its block count is whole)."""
    def lengths(cu) -> list[int]:
        return (cu[1:] - cu[:-1]).tolist()

    seqlens = [n for r in rows for n in lengths(r.cu_seqlens)]
    image_lengths = [n for r in rows for n in lengths(r.images.cu_seqlens)]
    visual = sum(len(r.visual_positions) for r in rows) / sum(len(r.tokens) for r in rows)
    measured = {"bench": flop_ratios(shape, seqlens, image_lengths), "real": flop_ratios(real, seqlens, image_lengths)}
    problems = [f"images fill {visual:.1%} of the rows, not {VISUAL_SHARE:.0%}"] if abs(visual - VISUAL_SHARE) > 0.02 \
        else []
    for key in ("encoder_per_llm", "lm_head_share"):
        bench, real_value = measured["bench"][key], measured["real"][key]
        if abs(bench / real_value - 1) > 0.10:
            problems.append(f"{key} is {bench:.3f} here vs {real_value:.3f} at the real shapes")
    if problems:
        raise SystemExit("error: the scaled bench is not the paper's setting: " + "; ".join(problems))
    return {"visual_share": visual, **{f"{k}_{n}": v for n, m in measured.items() for k, v in m.items()}}


def ideal_stage(cfg):
    """The discrete run's stage with the visual embeddings given: the LLM step alone."""
    import torch
    from megatron.core.transformer.module import MegatronModule

    from viq_megatron.models.multimodal import VisualOutput
    from viq_megatron.models.provider import build_llm_from_config, device, params_dtype
    from viq_megatron.training.stages import caption_stage

    class GivenEmbeddings(MegatronModule):
        """Precomputed embeddings of the scale an LLM's own have (zeros would drive CPU
        arithmetic into denormals)."""

        def __init__(self, config, hidden: int):
            super().__init__(config=config)
            self.register_buffer("table", torch.randn(cfg.data.seq_length, hidden, device=device(),
                                                      dtype=params_dtype(cfg.model.params_dtype)), persistent=False)

        def forward(self, batch) -> VisualOutput:
            return VisualOutput(self.table[:len(batch.visual_positions)])

    llm = build_llm_from_config(cfg)
    return caption_stage(cfg, GivenEmbeddings(llm[0].config, llm[0].config.hidden_size), llm)


def main() -> None:
    import torch

    from tools.preprocess_images import preprocess, visual_bytes
    from viq_megatron.config import ParallelConfig, load_config
    from viq_megatron.data.conversations import read_conversations
    from viq_megatron.data.multimodal import PackedConversationDataset
    from viq_megatron.data.text import SentencePieceTokenizer
    from viq_megatron.runtime.distributed import initialize, shutdown
    from viq_megatron.tokenizer import ViQTokenizer
    from viq_megatron.training.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", nargs="+", choices=sorted(LLMS), default=["0.5b", "1.5b"])
    parser.add_argument("--seq-lengths", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--encoder", nargs="+", choices=["frozen", "trained"], default=["frozen", "trained"])
    parser.add_argument("--width-scale", type=int, default=8)
    parser.add_argument("--depth-scale", type=int, default=4)
    parser.add_argument("--cached", action=argparse.BooleanOptionalAction, default=True,
                        help="time the cached-features path too (with --encoder frozen)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between steps (untimed)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of every path")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler trace of 2 steps per path here")
    parser.add_argument("--out", type=Path, help="data, token files and runs (default: a temporary folder)")
    args = parser.parse_args()

    initialize(ParallelConfig(), seed=0)
    gc.disable()
    torch.set_flush_denormal(True)  # CPUs: tiny values must not change the arithmetic's speed
    cuda = torch.cuda.is_available()
    w, d = args.width_scale, args.depth_scale
    temporary = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(temporary.name if temporary else args.out)
    out.mkdir(parents=True, exist_ok=True)
    text_model = out / "text" / "sp"
    SentencePieceTokenizer.train([" ".join(WORDS), "Describe the picture."] * 8, 400, text_model)
    text = SentencePieceTokenizer(text_model.with_suffix(".model"))
    results = []
    print(f"{'bf16, cuda' if cuda else 'fp32, cpu'}; widths / {w}, LLM depth / {d}; {args.num_workers} DataLoader workers "
          f"per path; median of {args.steps} steps per path")
    print("| LLM | seq | encoder | continuous s (data) | cached s (data) | discrete s (data) | ideal s (data) | "
          "speedup | measured ideal | FLOP ideal | discrete vs ideal | discrete vs cached |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.llm:
        real = shapes(name, 1, 1)
        for length in args.seq_lengths:
            shape = shapes(name, w, d)
            seqlens = [length // SAMPLES_PER_ROW] * SAMPLES_PER_ROW
            image_lengths = [math.prod(grid(round(seqlens[0] * VISUAL_SHARE)))] * SAMPLES_PER_ROW
            if (w, d) != (1, 1):
                matched(shape, real, seqlens, image_lengths)
            folder = out / f"{name}_{length}"
            shutil.rmtree(folder, ignore_errors=True)  # a new random tokenizer each run: no stale codes
            data, pixels = write_data(folder, length, text, count=8 * SAMPLES_PER_ROW)
            common = [*(f"model.{part}.{k}={v}" for part in ("encoder", "head") for k, v in shape[part].items()),
                      *(f"model.llm.arch.{k}={v}" for k, v in shape["arch"].items()),
                      f"model.llm.arch.max_sequence_length={length}",
                      "model.llm.tokenizer.kind=sentencepiece",
                      f"model.llm.tokenizer.sentencepiece_model={text_model.with_suffix('.model')}",
                      f"model.llm.tokenizer.sentencepiece_vocab_size={text.vocab_size}",
                      f"model.params_dtype={'bfloat16' if cuda else 'float32'}",
                      f"data.seq_length={length}", f"data.image.min_pixels={pixels}", f"data.image.max_pixels={pixels}",
                      f"data.num_workers={args.num_workers}", "train.steps=100000", "train.eval_every=0",
                      "train.save_every=0", "train.optimizer.warmup_steps=0", "train.optimizer.lr=1.0e-5",
                      "train.optimizer.min_lr=1.0e-5"]
            images = [f"data.train={data}", f"data.val={data}", "train.stage=continuous"]
            cfg = load_config(None, [*common, *images, f"train.output_dir={folder / 'runs' / 'probe'}"])

            # The rows every path reads, checked against the paper's proportions before any timing.
            samples = list(read_conversations(data))
            rows = PackedConversationDataset(samples, tokenizer=text, rules=cfg.data.image, patch=PATCH,
                                             seq_length=length, teacher_side=None, seed=cfg.seed)
            packed = [rows[r] for r in range(rows.rows_per_epoch())]
            proportions = check_proportions(shape, real, packed)
            print(f"| {name} | {length} | rows: images {proportions['visual_share']:.1%} of the tokens; per LLM FLOP "
                  f"(real shapes in brackets): encoder {proportions['encoder_per_llm_bench']:.3f} "
                  f"({proportions['encoder_per_llm_real']:.3f}), code embedding "
                  f"{proportions['code_embedding_per_llm_bench']:.3f} ({proportions['code_embedding_per_llm_real']:.3f}), "
                  f"LM head {proportions['lm_head_share_bench']:.1%} ({proportions['lm_head_share_real']:.1%}) "
                  "|||||||||", flush=True)

            tokenizer_dir = folder / "viq_tokenizer"
            ViQTokenizer(cfg, shape["arch"]["hidden_size"]).save(tokenizer_dir)
            offline = {"discrete": folder / "tokens"}
            if args.cached and "frozen" in args.encoder:
                offline["cached"] = folder / "features"
            tokenizer = ViQTokenizer.load(tokenizer_dir)
            for path, prefix in offline.items():
                if preprocess(samples, tokenizer, text, prefix, features=path == "cached"):
                    raise SystemExit(f"error: {prefix}: some samples could not be encoded (see its report)")
            patches = sum(len(row.visual_positions) for row in packed)
            stored = {path: visual_bytes(prefix) / patches for path, prefix in offline.items()}
            print(f"| {name} | {length} | bytes per patch: codes {stored['discrete']:.0f}"
                  + (f", features {stored['cached']:.0f} ({2 * real['encoder']['hidden_size']} at SO400M's width)"
                     if "cached" in stored else "") + " |||||||||", flush=True)
            discrete = ["train.stage=discrete", f"model.viq_tokenizer={tokenizer_dir}", "train.freeze=[visual.head]",
                        f"data.train={offline['discrete']}", f"data.val={offline['discrete']}"]
            runs = {}
            for mode in args.encoder:
                freeze = "[visual.encoder]" if mode == "frozen" else "[]"
                runs[f"continuous_{mode}"] = ([*common, *images, f"train.freeze={freeze}"], None)
            if "cached" in offline:
                runs["cached"] = ([*common, "train.stage=cached", f"model.viq_tokenizer={tokenizer_dir}",
                                   "train.freeze=[]", f"data.train={offline['cached']}",
                                   f"data.val={offline['cached']}"], None)
            runs["discrete"] = ([*common, *discrete], None)
            runs["ideal"] = ([*common, *discrete], ideal_stage)
            trainers = {path: Trainer(load_config(None, [*overrides, f"train.output_dir={folder / 'runs' / path}"]),
                                      build_stage=builder)
                        for path, (overrides, builder) in runs.items()}
            times = {path: [] for path in trainers}
            for step in range(args.warmup + args.steps):
                for path, trainer in trainers.items():
                    gc.collect()  # torchtitan's manual GC: never inside a timed step
                    time.sleep(args.pause)
                    metrics = trainer.train_step()
                    if step >= args.warmup:
                        times[path].append((metrics["step_time_s"], metrics["data_time_s"]))
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                for path, trainer in trainers.items():
                    activities = [torch.profiler.ProfilerActivity.CPU] + (
                        [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                    with torch.profiler.profile(activities=activities) as profiler:
                        for _ in range(2):
                            trainer.train_step()
                    stem = args.profile / f"{name}_{length}_{path}"
                    profiler.export_chrome_trace(f"{stem}.json")
                    Path(f"{stem}.txt").write_text(profiler.key_averages().table(
                        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30))
            median = {path: (statistics.median(t for t, _ in v), statistics.median(dt for _, dt in v))
                      for path, v in times.items()}
            discrete_s, ideal_s = median["discrete"][0], median["ideal"][0]
            for mode in args.encoder:
                continuous_s, data_s = median[f"continuous_{mode}"]
                # LLM step: 3 forwards; the encoder adds 1 forward, or 3 when it trains.
                flop_ideal = 1 + (3 if mode == "trained" else 1) * proportions["encoder_per_llm_bench"] / 3
                result = {"llm": name, "seq_length": length, "encoder": mode, "continuous_s": continuous_s,
                          "continuous_data_s": data_s, "discrete_s": discrete_s, "discrete_data_s": median["discrete"][1],
                          "ideal_s": ideal_s, "ideal_data_s": median["ideal"][1], "speedup": continuous_s / discrete_s,
                          "measured_ideal": continuous_s / ideal_s, "flop_ideal": flop_ideal, **proportions,
                          "bytes_per_patch": stored,
                          "step_times_s": {path: [t for t, _ in v] for path, v in times.items()},
                          "data_times_s": {path: [dt for _, dt in v] for path, v in times.items()}}
                cached = mode == "frozen" and "cached" in median  # the cached features are the frozen encoder's
                if cached:
                    result.update(cached_s=median["cached"][0], cached_data_s=median["cached"][1])
                results.append(result)
                print(f"| {name} | {length} | {mode} | {continuous_s:.3f} ({data_s:.3f}) | "
                      + (f"{median['cached'][0]:.3f} ({median['cached'][1]:.3f})" if cached else "-")
                      + f" | {discrete_s:.3f} ({median['discrete'][1]:.3f}) | {ideal_s:.3f} ({median['ideal'][1]:.3f}) | "
                      f"{result['speedup']:.2f}x | {result['measured_ideal']:.2f}x | {flop_ideal:.2f}x | "
                      f"{discrete_s / ideal_s - 1:+.1%} | "
                      + (f"{discrete_s / median['cached'][0] - 1:+.1%}" if cached else "-") + " |", flush=True)
            for trainer in trainers.values():
                trainer.close()
            del trainers
    (out / "bench_speedup.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'bench_speedup.json'}" if temporary is None else "")
    if temporary:
        temporary.cleanup()
    shutdown()


if __name__ == "__main__":
    main()
