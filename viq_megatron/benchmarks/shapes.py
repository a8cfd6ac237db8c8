"""The speed bench's model shapes: the paper's (a SigLIP2-SO400M encoder with Qwen2.5-0.5B or
1.5B) and CPU-sized ones that keep their FLOP proportions.

Widths are divided by `w` and the LLM's depth by `d`; the vocabulary, the encoder's depth and
the head's post-blocks are then chosen (`matched`) so that the LM head's share of the LLM's
FLOPs and the encoder's and code embedding's FLOPs per LLM FLOP are the real shapes' (attention's
share grows as widths shrink). `check_proportions` refuses packed rows and shapes off that setting
before anything is timed.
"""

from __future__ import annotations

import math

from viq_megatron.config import EncoderConfig, HeadConfig, LLMArch
from viq_megatron.models.flops import code_embedding_forward_flops, llm_forward_flops, vit_forward_flops

# (hidden, layers, heads, kv groups, ffn, vocab)
LLMS = {"0.5b": (896, 24, 14, 2, 4864, 151936), "1.5b": (1536, 28, 12, 2, 8960, 151936)}
SO400M = (1152, 27, 16, 4304)  # hidden, layers, heads, ffn
SAMPLES_PER_ROW, VISUAL_SHARE, PATCH = 4, 0.75, 16


def scaled(value: int, divisor: int, multiple: int = 1) -> int:
    return max(multiple, round(value / divisor / multiple) * multiple)


def shapes(llm: str, w: int, d: int) -> dict[str, dict]:
    """Override values of model.encoder, model.head and model.llm.arch at 1/w width and 1/d
    depth (before `matched`)."""
    h, layers, heads, groups, ffn, vocab = LLMS[llm]
    head = dict(
        pre_layers=3,
        subtoken_size=256,
        subtoken_layers=3,
        subtoken_ffn_size=4096,  # the GPU example's
        post_blocks=2,
    )
    if w == d == 1:
        encoder = dict(
            hidden_size=SO400M[0], num_layers=SO400M[1], num_attention_heads=SO400M[2], ffn_hidden_size=SO400M[3]
        )
        arch = dict(
            hidden_size=h,
            num_layers=layers,
            num_attention_heads=heads,
            num_query_groups=groups,
            ffn_hidden_size=ffn,
            vocab_size=vocab,
        )
    else:  # the head's blocks before the quantizer only write the codes: one of each
        encoder = dict(
            hidden_size=scaled(SO400M[0], w, 16),
            num_layers=scaled(SO400M[1], d),
            num_attention_heads=4,
            ffn_hidden_size=scaled(SO400M[3], w, 16),
        )
        head = dict(
            head,
            pre_layers=1,
            subtoken_size=scaled(256, w, 4),
            subtoken_layers=1,
            subtoken_ffn_size=scaled(4096, w, 16),
        )
        arch = dict(
            hidden_size=scaled(h, w, 32),
            num_layers=scaled(layers, d),
            num_attention_heads=2,
            num_query_groups=1,
            ffn_hidden_size=scaled(ffn, w, 16),
            vocab_size=vocab,
        )
    arch.update(qkv_bias=True, tie_word_embeddings=False, model_type="qwen2")
    return {"encoder": encoder, "head": {**head, "quantizer": "fsq"}, "arch": arch}


def flop_ratios(shape: dict[str, dict], seqlens: list[int], image_lengths: list[int]) -> dict[str, float]:
    """Forward FLOPs over the LLM's, on rows of `seqlens` tokens holding images of
    `image_lengths` patches: the encoder's, the discrete path's code embedding's, the LM head's."""
    encoder, arch = EncoderConfig(**shape["encoder"]), LLMArch(**shape["arch"])
    llm = llm_forward_flops(arch, seqlens)
    return {
        "encoder_per_llm": vit_forward_flops(encoder, image_lengths) / llm,
        "code_embedding_per_llm": code_embedding_forward_flops(
            HeadConfig(**shape["head"]), encoder, arch.hidden_size, sum(image_lengths)
        )
        / llm,
        "lm_head_share": 2 * sum(seqlens) * arch.hidden_size * arch.vocab_size / llm,
    }


def matched(shape: dict[str, dict], real: dict[str, dict], seqlens: list[int], image_lengths: list[int]) -> None:
    """Sets the scaled vocabulary, encoder depth and head post-blocks so that the LM head's
    share and the encoder's and code embedding's FLOPs per LLM FLOP are the real shapes' on
    these rows (the nearest depth and block count; shrinking widths grows attention's share)."""
    target = flop_ratios(real, seqlens, image_lengths)
    arch = shape["arch"]
    current = flop_ratios(shape, seqlens, image_lengths)["lm_head_share"]  # = kV / (body + kV): solve for V
    share = target["lm_head_share"]
    arch["vocab_size"] = scaled(share / (1 - share) * (1 - current) / (current / arch["vocab_size"]), 1, 128)
    for part, key, ratio in (
        ("encoder", "num_layers", "encoder_per_llm"),
        ("head", "post_blocks", "code_embedding_per_llm"),
    ):
        shape[part][key] = min(
            range(0 if part == "head" else 1, 2 * real[part][key] + 1),
            key=lambda n: abs(
                flop_ratios({**shape, part: {**shape[part], key: n}}, seqlens, image_lengths)[ratio] - target[ratio]
            ),
        )


def grid(patches: int) -> tuple[int, int]:
    """(rows, columns) of patches: the most square grid of about `patches` (never more)."""
    best = None
    for n in range(patches, max(patches - 4, 1), -1):
        rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
        if best is None or rows / (n // rows) > best[0] / best[1] + 0.2:
            best = (rows, n // rows)
    return best


def nominal_layout(length: int) -> tuple[list[int], list[int]]:
    """(sample lengths, image lengths in patches) of a row of `length` tokens as the bench
    lays it out: SAMPLES_PER_ROW samples, each with one image of about VISUAL_SHARE of it."""
    seqlens = [length // SAMPLES_PER_ROW] * SAMPLES_PER_ROW
    return seqlens, [math.prod(grid(round(seqlens[0] * VISUAL_SHARE)))] * SAMPLES_PER_ROW


def bench_shapes(llm: str, length: int, w: int, d: int) -> tuple[dict[str, dict], dict[str, dict]]:
    """(the shapes to run, the real shapes) for rows of `length` tokens: matched where scaled."""
    shape, real = shapes(llm, w, d), shapes(llm, 1, 1)
    if (w, d) != (1, 1):
        matched(shape, real, *nominal_layout(length))
    return shape, real


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
    problems = (
        [f"images fill {visual:.1%} of the rows, not {VISUAL_SHARE:.0%}"] if abs(visual - VISUAL_SHARE) > 0.02 else []
    )
    for key in ("encoder_per_llm", "lm_head_share"):
        bench, real_value = measured["bench"][key], measured["real"][key]
        if abs(bench / real_value - 1) > 0.10:
            problems.append(f"{key} is {bench:.3f} here vs {real_value:.3f} at the real shapes")
    if problems:
        raise SystemExit("error: the scaled bench is not the paper's setting: " + "; ".join(problems))
    return {"visual_share": visual, **{f"{k}_{n}": v for n, m in measured.items() for k, v in m.items()}}


def flop_ideal(encoder_per_llm: float, encoder_trained: bool) -> float:
    """Continuous step FLOPs over the LLM step's: the LLM step is 3 forwards; the encoder adds
    1 forward, or 3 when it trains."""
    return 1 + (3 if encoder_trained else 1) * encoder_per_llm / 3
