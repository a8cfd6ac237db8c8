"""Stage 2, discretisation: the ViQ quantization head between encoder and projector (2-1: the
L-inf projection, 2-2: FSQ, or the progressive blend from one into the other), trained by the
caption loss, distillation toward the (frozen) stage-1 encoder's pooled features, an optional
reconstruction of its tokens and, with train.pixel_weight, a pixel decoder drawing its codes.
Initialised from a stage-1 checkpoint (train.init_from)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from viq_megatron.config import Config, require
from viq_megatron.data.multimodal import PackedBatch
from viq_megatron.models.codebook import CodebookStats
from viq_megatron.models.multimodal import QuantizedVisualInput, VisualOutput
from viq_megatron.models.pixel_decoder import PixelDecoder, pixel_losses
from viq_megatron.models.provider import build_pixel_decoder, quantized_input
from viq_megatron.training.stages.base import CaptionStage, Stage
from viq_megatron.training.stages.decoder import draw, pixel_counts, pixel_weights


class Stage2(CaptionStage):
    name = "stage2"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.model.decoder is None:  # a decoder lets the stage draw its codes (train.pixel_weight)
            Stage.check_config(cfg)
        require(cfg.model.head is not None, "model.head", "missing (train.stage stage2 trains it)")

    @property
    def visual_weights(self) -> dict[str, float]:
        return pixel_weights(self.cfg, self.cfg.train.pixel_weight, "pixel_") if self.drawing else {}

    def __init__(self, cfg: Config):
        self.drawing = cfg.train.pixel_weight > 0
        super().__init__(cfg)
        if self.visual is not None:
            head = self.visual.head
            self.mean, self.std = (
                torch.tensor(v, device=head.from_code.weight.device) for v in (cfg.data.image.mean, cfg.data.image.std)
            )
            self.stats = CodebookStats(head.quantizer.fsq)

    def build_visual(self, cfg: Config, llm_config) -> QuantizedVisualInput:
        return quantized_input(cfg, llm_config.hidden_size)

    def build_decoder(self, cfg: Config) -> PixelDecoder | None:
        return build_pixel_decoder(cfg) if self.drawing else None

    def distill_target(self, output: VisualOutput, batch: PackedBatch) -> torch.Tensor:
        # The head must keep what the text-aligned stage-1 encoder carries.
        return self.visual.pool(output.encoder_tokens.detach(), batch.images.cu_seqlens)

    def visual_terms(self, output: VisualOutput, batch: PackedBatch) -> dict[str, torch.Tensor]:
        terms, head = {}, self.visual.head
        if self.cfg.train.reconstruct_weight != 0:
            target = output.encoder_tokens.detach().float()
            terms["reconstruct"] = F.mse_loss(output.features.float(), target, reduction="none").mean(-1).sum()
        if self.drawing:  # the decoder draws what the quantizer passes on: codes that keep the picture
            drawn = draw(
                head,
                self.decoder,
                head.quantizer(output.bottleneck),
                batch.images,
                self.cfg.model.encoder.patch_size,
                self.mean,
                self.std,
            )
            terms.update({f"pixel_{k}": v for k, v in pixel_losses(*drawn).items()})
        if head.quantizer.kind != "identity":
            with torch.no_grad():
                self.stats.add(head.indices(output.bottleneck))
        return terms

    def visual_counts(self, batch: PackedBatch) -> dict[str, float]:
        return pixel_counts(batch, prefix="pixel_") if self.drawing else {}

    def on_step(self, step: int) -> dict:
        if self.visual is None:
            return {}
        quantizer, cfg = self.visual.head.quantizer, self.cfg
        blend = 1.0
        if quantizer.kind == "progressive":  # module state: checkpoints and inference keep it
            blend = min(1.0, step / cfg.model.head.progressive_steps)
            quantizer.blend = blend
        if cfg.train.codebook_every > 0 and step > 0 and step % cfg.train.codebook_every == 0:
            return {"fsq_blend": blend, **self.stats.summary()}
        return {}
