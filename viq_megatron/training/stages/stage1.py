"""Stage 1, text-aligned pre-training: the encoder and projector learn from a (frozen by
default) pretrained LLM's caption loss, while a frozen fixed-resolution copy of the starting
encoder anchors its pooled features (self-distillation)."""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from viq_megatron.config import Config
from viq_megatron.data.multimodal import PackedBatch
from viq_megatron.models.multimodal import EncoderVisualInput, VisualOutput
from viq_megatron.models.provider import encoder_input
from viq_megatron.training.stages.base import CaptionStage
from viq_megatron.training.stages.continuous import Continuous


class Stage1(CaptionStage):
    name = "stage1"
    teacher_images = True
    frozen = ("visual.teacher", "visual.pooling")

    def build_visual(self, cfg: Config, llm_config) -> EncoderVisualInput:
        visual = encoder_input(cfg, llm_config.hidden_size, teacher=True)
        visual.teacher.load_state_dict(visual.encoder.state_dict())  # the encoder stage 1 starts from
        return visual

    @classmethod
    def inference_model(cls, cfg: Config, online: bool) -> tuple[MegatronModule, Config, tuple[str, ...]]:
        """The continuous model: the teacher and its pooling head are the distillation target only."""
        return Continuous(cfg).chunks[0], cfg, ()

    def after_init_from(self) -> None:
        if self.visual is not None:  # the teacher is the loaded encoder
            self.visual.teacher.load_state_dict(self.visual.encoder.state_dict())

    def distill_target(self, output: VisualOutput, batch: PackedBatch) -> torch.Tensor:
        return self.visual.pool(self.visual.teacher(batch.teacher_images), batch.teacher_images.cu_seqlens)
