"""Stage 1, text-aligned pre-training: the encoder and projector learn from a (frozen by
default) pretrained LLM's caption loss, while a frozen fixed-resolution copy of the starting
encoder anchors its pooled features (self-distillation)."""

from __future__ import annotations

import torch

from viq_megatron.config import Config
from viq_megatron.data.multimodal import PackedBatch
from viq_megatron.models.multimodal import EncoderVisualInput, VisualOutput
from viq_megatron.models.provider import encoder_input
from viq_megatron.training.stages.base import CaptionStage


class Stage1(CaptionStage):
    name = "stage1"
    teacher_images = True
    frozen = ("visual.teacher", "visual.pooling")
    training_only = ("visual.teacher.", "visual.pooling.")  # the distillation target

    def build_visual(self, cfg: Config, llm_config) -> EncoderVisualInput:
        visual = encoder_input(cfg, llm_config.hidden_size, teacher=True)
        visual.teacher.load_state_dict(visual.encoder.state_dict())  # the encoder stage 1 starts from
        return visual

    def after_init_from(self) -> None:
        if self.visual is not None:  # the teacher is the loaded encoder
            self.visual.teacher.load_state_dict(self.visual.encoder.state_dict())

    def distill_target(self, output: VisualOutput, batch: PackedBatch) -> torch.Tensor:
        return self.visual.pool(self.visual.teacher(batch.teacher_images), batch.teacher_images.cu_seqlens)
