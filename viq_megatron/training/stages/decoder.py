"""The pixel decoder learns to draw the tokenizer's codes: L1 + SSIM, with PSNR reported
(train.init_from a stage-2 run with train.freeze [visual.head]; or with the head training too:
stage 2-0). The encoder (and the projector, unused here) never train; no LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from viq_megatron.config import Config, require
from viq_megatron.data.multimodal import PackedBatch
from viq_megatron.models.multimodal import QuantizedVisualInput
from viq_megatron.models.pixel_decoder import PixelDecoder, drawn_and_original, pixel_losses
from viq_megatron.models.provider import build_pixel_decoder, llm_arch, quantized_input
from viq_megatron.models.viq_head import ViQHead
from viq_megatron.models.vit import row_blocked
from viq_megatron.training.stages.base import Stage


@dataclass
class Reconstruction:
    drawn: list[torch.Tensor]  # the decoder's drawing of each image [3, H, W] in [0, 1]
    original: list[torch.Tensor]  # the image itself


def draw(
    head: ViQHead,
    decoder: PixelDecoder,
    quantized: torch.Tensor,
    images,
    patch: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(drawn, original) images [3, H, W] in [0, 1]: the decoder's drawing of packed images from
    their quantized bottleneck vectors [N, 4, d] (through the head's `from_code`), beside them."""
    subtokens = row_blocked(head.from_code, quantized.reshape(-1, quantized.shape[-1]).to(head.from_code.weight.dtype))
    return drawn_and_original(decoder(subtokens, images.grids), images, patch, mean, std)


def pixel_counts(batch: PackedBatch, prefix: str = "") -> dict[str, float]:
    """What each of `pixel_losses`' sums is divided by: pixel values for L1, images for SSIM and PSNR."""
    images = batch.images
    if images is None:
        return {}
    return {
        f"{prefix}l1": float(images.patches.numel()),
        f"{prefix}ssim": float(images.num_images),
        f"{prefix}psnr": float(images.num_images),
    }


def pixel_weights(cfg: Config, scale: float = 1.0, prefix: str = "") -> dict[str, float]:
    """SSIM first: alone, the decoder stage counts its objective in images (objective.py's unit),
    not in pixel values, which overflow Megatron's int32 token count on large batches."""
    decoder = cfg.model.decoder
    return {
        f"{prefix}ssim": scale * decoder.ssim_weight,
        f"{prefix}l1": scale * decoder.l1_weight,
        f"{prefix}psnr": 0.0,
    }


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
        return Reconstruction(
            *draw(head, self.decoder, quantized, images, self.visual.encoder.patch_size, self.mean, self.std)
        )


class Decoder(Stage):
    name = "decoder"
    frozen = ("visual.encoder", "visual.projector")
    answers = False

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        require(
            cfg.model.head is not None and cfg.model.decoder is not None,
            "model.decoder",
            "the decoder stage needs model.head and model.decoder",
        )
        require(
            cfg.parallel.pipeline_model_parallel_size == 1,
            "parallel.pipeline_model_parallel_size",
            "the decoder stage has no LLM to split into stages",
        )

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.chunks = [
            ReconstructionModel(
                quantized_input(cfg, llm_arch(cfg).hidden_size),
                build_pixel_decoder(cfg),
                cfg.data.image.mean,
                cfg.data.image.std,
            )
        ]
        self.weights = pixel_weights(cfg)

    def loss_terms(self, batch: PackedBatch, output: Reconstruction) -> dict[str, torch.Tensor]:
        return pixel_losses(output.drawn, output.original)

    def counts(self, batch: PackedBatch) -> dict[str, float]:
        return pixel_counts(batch)
