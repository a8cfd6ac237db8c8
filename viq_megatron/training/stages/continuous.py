"""The continuous baseline: images decoded and run through the encoder + projector every step
(train.init_from a stage-1 run; train.freeze [visual.encoder] or train it)."""

from __future__ import annotations

from viq_megatron.config import Config
from viq_megatron.models.multimodal import EncoderVisualInput
from viq_megatron.models.provider import encoder_input
from viq_megatron.training.stages.base import CaptionStage


class Continuous(CaptionStage):
    name = "continuous"

    def build_visual(self, cfg: Config, llm_config) -> EncoderVisualInput:
        return encoder_input(cfg, llm_config.hidden_size)
