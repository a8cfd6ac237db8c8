"""Training stages: what each one builds, trains and freezes, and which losses it adds.

The loop (trainer.py) is the same for every stage. A stage supplies its model (this
rank's pipeline chunks of it), the modules it never trains, its loss terms as local sums
read from a chunk's typed output, the count each sum is normalised by (known before the
forward pass, so normalisation is global over ranks and micro-batches) and their weights;
training/objective.py turns them into Megatron-Core's loss contract.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from viq_megatron.config import Config
from viq_megatron.data.multimodal import PackedBatch
from viq_megatron.models.flops import llm_forward_flops, vit_forward_flops
from viq_megatron.models.multimodal import MultimodalOutput, QuantizedVisualInput, VisionLanguageModel, VisualOutput
from viq_megatron.models.pixel_decoder import PixelDecoder, drawn_and_original, pixel_losses
from viq_megatron.models.provider import (build_llm_from_config, build_pixel_decoder, code_input, encoder_input,
                                          feature_input, llm_arch, quantized_input)
from viq_megatron.models.viq_head import ViQHead
from viq_megatron.models.vit import row_blocked
from viq_megatron.training.codebook import CodebookStats


@dataclass
class Stage:
    chunks: list[MegatronModule]  # this rank's pipeline chunks (one without pipeline parallelism)
    # The local loss sums a chunk's output holds: {name: sum} (the visual terms on the first
    # pipeline stage, the caption on the last).
    loss_terms: Callable[[PackedBatch, Any], dict[str, torch.Tensor]]
    counts: Callable[[PackedBatch], dict[str, float]]  # what each sum is divided by
    weights: dict[str, float]  # objective = sum of weight * global mean
    frozen: tuple[str, ...] = ()  # module prefixes the stage never trains (train.freeze adds more)
    on_step: Callable[[int], dict] = field(default=lambda step: {})  # schedules; extra metrics to log
    flops: Callable[[PackedBatch], float] = field(default=lambda batch: 0.0)  # counted FLOPs of a training step
    on_init_from: Callable[[], None] = field(default=lambda: None)  # after train.init_from loaded weights


def distillation(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image loss between pooled features [images, hidden], summed over images."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).sum()
    return F.mse_loss(student.float(), teacher.float(), reduction="none").mean(-1).sum()


def caption_stage(cfg: Config, visual: MegatronModule, llm_chunks: list, distill_target=None,
                  visual_terms=None, visual_counts=None, visual_weights: dict[str, float] | None = None,
                  decoder: PixelDecoder | None = None, frozen: tuple[str, ...] = ()) -> Stage:
    """Caption loss through the LLM (on its last pipeline stage) + (with `distill_target`)
    self-distillation of the visual features' pooled vector toward
    `distill_target(visual output, batch)` (pooled, one row per image) and `visual_terms(visual
    output, batch)` (both on the first stage; counted by `visual_counts(batch)`, weighted by
    `visual_weights`). A pixel `decoder` (stage 2) lives beside the visual input."""
    chunks = [VisionLanguageModel(visual, llm, decoder) for llm in llm_chunks]

    def loss_terms(batch: PackedBatch, output: MultimodalOutput) -> dict[str, torch.Tensor]:
        terms = {}
        if output.token_losses is not None:
            terms["caption"] = (output.token_losses * batch.loss_mask.to(output.token_losses.device)).sum()
        if output.visual is not None and distill_target is not None:
            student = visual.pool(output.visual.features, batch.images.cu_seqlens)
            with torch.no_grad():
                target = distill_target(output.visual, batch)
            terms["distill"] = distillation(student, target, cfg.train.distill_loss)
            if visual_terms is not None:
                terms.update(visual_terms(output.visual, batch))
        return terms

    def counts(batch: PackedBatch) -> dict[str, float]:
        images = float(batch.images.num_images) if batch.images is not None else 0.0
        tokens = float(batch.images.num_tokens) if batch.images is not None else 0.0
        return {"caption": float(batch.num_loss_tokens), "distill": images, "reconstruct": tokens,
                **(visual_counts(batch) if visual_counts is not None else {})}

    weights = {"caption": 1.0, "distill": cfg.train.distill_weight, "reconstruct": cfg.train.reconstruct_weight,
               **(visual_weights or {})}
    arch = llm_arch(cfg)
    encoder = getattr(visual, "encoder", None)

    def flops(batch: PackedBatch) -> float:
        """LLM forward + backward (3x forward); the encoder's forward, and its backward when it trains."""
        total = 3 * llm_forward_flops(arch, (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist())
        if encoder is not None and batch.images is not None:
            trained = any(p.requires_grad for p in encoder.parameters())
            lengths = (batch.images.cu_seqlens[1:] - batch.images.cu_seqlens[:-1]).tolist()
            total += (3 if trained else 1) * vit_forward_flops(cfg.model.encoder, lengths)
        return total

    return Stage(chunks, loss_terms, counts, weights, frozen, flops=flops)


def build_stage1(cfg: Config) -> Stage:
    """Encoder + projector learn from a (frozen by default) pretrained LLM's caption loss,
    while a frozen fixed-resolution copy of the encoder anchors its pooled features."""
    llm = build_llm_from_config(cfg)
    visual = encoder_input(cfg, llm[0].config.hidden_size, teacher=True)

    def copy_encoder_to_teacher() -> None:  # the teacher is the encoder stage 1 starts from
        visual.teacher.load_state_dict(visual.encoder.state_dict())

    def fixed_resolution_teacher(output: VisualOutput, batch: PackedBatch) -> torch.Tensor:
        return visual.pool(visual.teacher(batch.teacher_images), batch.teacher_images.cu_seqlens)

    copy_encoder_to_teacher()
    stage = caption_stage(cfg, visual, llm, fixed_resolution_teacher, frozen=("visual.teacher", "visual.pooling"))
    stage.on_init_from = copy_encoder_to_teacher
    return stage


def build_stage2(cfg: Config) -> Stage:
    """The quantization head between encoder and projector (2-1: linf, 2-2: fsq, or the
    progressive bridge), trained by the caption loss, distillation toward the (frozen)
    stage-1 encoder's pooled features and an optional reconstruction of its tokens.
    Initialised from a stage-1 checkpoint (train.init_from)."""
    llm = build_llm_from_config(cfg)
    visual = quantized_input(cfg, llm[0].config.hidden_size)
    head = visual.head
    drawing = cfg.train.pixel_weight > 0
    decoder = build_pixel_decoder(cfg) if drawing else None
    mean, std = (torch.tensor(v, device=head.from_code.weight.device) for v in (cfg.data.image.mean, cfg.data.image.std))
    stats = CodebookStats(head.quantizer.fsq)

    def stage1_features(output: VisualOutput, batch: PackedBatch) -> torch.Tensor:
        # The head must keep what the text-aligned stage-1 encoder carries.
        return visual.pool(output.encoder_tokens.detach(), batch.images.cu_seqlens)

    def head_terms(output: VisualOutput, batch: PackedBatch) -> dict[str, torch.Tensor]:
        terms = {}
        if cfg.train.reconstruct_weight != 0:
            target = output.encoder_tokens.detach().float()
            terms["reconstruct"] = F.mse_loss(output.features.float(), target, reduction="none").mean(-1).sum()
        if drawing:  # the decoder draws what the quantizer passes on: codes that keep the picture
            drawn = draw(head, decoder, head.quantizer(output.bottleneck), batch.images,
                         cfg.model.encoder.patch_size, mean, std)
            terms.update({f"pixel_{k}": v for k, v in pixel_losses(*drawn).items()})
        if head.quantizer.kind != "identity":
            with torch.no_grad():
                stats.add(head.indices(output.bottleneck))
        return terms

    def on_step(step: int) -> dict:
        if head.quantizer.kind == "progressive":
            head.quantizer.blend = min(1.0, step / cfg.model.head.progressive_steps)
        if cfg.train.codebook_every > 0 and step > 0 and step % cfg.train.codebook_every == 0:
            return {"fsq_blend": head.quantizer.blend, **stats.summary()}
        return {}

    stage = caption_stage(cfg, visual, llm, stage1_features, head_terms,
                          partial(pixel_counts, prefix="pixel_") if drawing else None,
                          pixel_weights(cfg, cfg.train.pixel_weight, "pixel_") if drawing else None, decoder)
    stage.on_step = on_step
    return stage


@dataclass
class Reconstruction:
    drawn: list[torch.Tensor]  # the decoder's drawing of each image [3, H, W] in [0, 1]
    original: list[torch.Tensor]  # the image itself


class ReconstructionModel(MegatronModule):
    """A frozen tokenizer (encoder + head) and the pixel decoder it feeds."""

    def __init__(self, visual: QuantizedVisualInput, decoder: PixelDecoder, mean: list[float], std: list[float]):
        super().__init__(config=decoder.config)
        self.visual = visual
        self.decoder = decoder
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)
        self.pre_process = self.post_process = True  # never pipelined: no LLM
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, input_tensor) -> None:
        """Called by the pipeline schedule; a single stage has no input from another."""

    def forward(self, batch: PackedBatch) -> Reconstruction:
        """The decoder's drawing of a batch's images from the tokenizer's codes. The encoder is
        frozen and runs without a graph; so does the head when it is frozen too (train.freeze
        [visual.head]: the decoder learns to draw a finished tokenizer), else it trains with the
        decoder (stage 2-0)."""
        head, images = self.visual.head, batch.images
        with torch.no_grad():
            tokens = self.visual.encoder(images)
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters())):
            quantized = head.quantizer(head.pre_quantization(tokens, images))
        return Reconstruction(*draw(head, self.decoder, quantized, images, self.visual.encoder.patch_size,
                                    self.mean, self.std))


def draw(head: ViQHead, decoder: PixelDecoder, quantized: torch.Tensor, images, patch: int, mean: torch.Tensor,
         std: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(drawn, original) images [3, H, W] in [0, 1]: the decoder's drawing of packed images from
    their quantized bottleneck vectors [N, 4, d] (through the head's `from_code`), beside them."""
    subtokens = row_blocked(head.from_code, quantized.reshape(-1, quantized.shape[-1]).to(head.from_code.weight.dtype))
    return drawn_and_original(decoder(subtokens, images.grids), images, patch, mean, std)


def build_decoder_stage(cfg: Config) -> Stage:
    """The pixel decoder learns to draw the tokenizer's codes (train.init_from a stage-2 run,
    train.freeze [visual.head]; or with the head, stage 2-0): L1 + SSIM, with PSNR reported.
    The encoder (and the projector, unused here) never train."""
    model = ReconstructionModel(quantized_input(cfg, llm_arch(cfg).hidden_size), build_pixel_decoder(cfg),
                                cfg.data.image.mean, cfg.data.image.std)

    def loss_terms(batch: PackedBatch, output: Reconstruction) -> dict[str, torch.Tensor]:
        return pixel_losses(output.drawn, output.original)

    return Stage([model], loss_terms, pixel_counts, pixel_weights(cfg), frozen=("visual.encoder", "visual.projector"))


def pixel_counts(batch: PackedBatch, prefix: str = "") -> dict[str, float]:
    """What each of `pixel_losses`' sums is divided by: pixel values for L1, images for SSIM and PSNR."""
    images = batch.images
    if images is None:
        return {}
    return {f"{prefix}l1": float(images.patches.numel()), f"{prefix}ssim": float(images.num_images),
            f"{prefix}psnr": float(images.num_images)}


def pixel_weights(cfg: Config, scale: float = 1.0, prefix: str = "") -> dict[str, float]:
    """SSIM first: alone, the decoder stage counts its objective in images (objective.py's unit),
    not in pixel values, which overflow Megatron's int32 token count on large batches."""
    decoder = cfg.model.decoder
    return {f"{prefix}ssim": scale * decoder.ssim_weight, f"{prefix}l1": scale * decoder.l1_weight,
            f"{prefix}psnr": 0.0}


def build_continuous(cfg: Config) -> Stage:
    """The baseline: images decoded and run through the encoder + projector every step
    (train.init_from a stage-1 run; freeze [visual.encoder] or train it)."""
    llm = build_llm_from_config(cfg)
    return caption_stage(cfg, encoder_input(cfg, llm[0].config.hidden_size), llm)


def build_discrete(cfg: Config) -> Stage:
    """Training on offline codes: the exported tokenizer's head + projector embed them (built
    at this run's tensor-parallel size; the tokenizer's encoder is not needed)."""
    llm = build_llm_from_config(cfg)
    return caption_stage(cfg, code_input(cfg, llm[0].config.hidden_size), llm)


def build_cached(cfg: Config) -> Stage:
    """The cached-features baseline: the continuous path with its frozen encoder's tokens stored
    offline (tools/preprocess_images.py --features with model.viq_tokenizer, whose projector
    starts the run, or train.init_from a stage-1 run's): like discrete training, no image and no
    encoder at training time."""
    llm = build_llm_from_config(cfg)
    return caption_stage(cfg, feature_input(cfg, llm[0].config), llm)


STAGES = {"stage1": build_stage1, "stage2": build_stage2, "decoder": build_decoder_stage,
          "continuous": build_continuous, "discrete": build_discrete, "cached": build_cached}
