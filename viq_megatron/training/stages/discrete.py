"""Multimodal training on offline ViQ codes (tools/preprocess_images.py): the exported
tokenizer's head + projector embed them, built at this run's tensor-parallel size; no image and
no encoder at training time. For questions with images, inference reads them through the
tokenizer's encoder and head (the same codes, bit for bit)."""

from __future__ import annotations

from megatron.core.transformer.module import MegatronModule

from viq_megatron.config import Config, require
from viq_megatron.models.multimodal import CodeVisualInput
from viq_megatron.models.provider import code_input, quantized_input
from viq_megatron.training.stages.base import CaptionStage, tokenizer_visual_model


class Discrete(CaptionStage):
    name = "discrete"
    data = "codes"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        require(
            bool(cfg.model.viq_tokenizer),
            "model.viq_tokenizer",
            "missing (the discrete stage embeds the codes with a ViQTokenizer directory's head)",
        )

    def build_visual(self, cfg: Config, llm_config) -> CodeVisualInput:
        return code_input(cfg, llm_config.hidden_size)

    @classmethod
    def inference_model(cls, cfg: Config, online: bool) -> tuple[MegatronModule, Config, tuple[str, ...]]:
        if not online:
            return super().inference_model(cfg, online)
        model, tokenizer_cfg = tokenizer_visual_model(cfg, quantized_input, ("encoder", "head"))
        return model, tokenizer_cfg, ("visual.",)  # the run's checkpoint overrides the head, holds the projector
