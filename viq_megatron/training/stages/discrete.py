"""Multimodal training on offline ViQ codes (tools/preprocess_images.py): the exported
tokenizer's head + projector embed them, built at this run's tensor-parallel size; no image and
no encoder at training time. For questions with images, inference reads them through the
tokenizer's encoder and head (the same codes, bit for bit)."""

from __future__ import annotations

from viq_megatron.config import Config
from viq_megatron.models.multimodal import CodeVisualInput
from viq_megatron.models.provider import code_input, quantized_input
from viq_megatron.training.stages.base import OfflineStage


class Discrete(OfflineStage):
    name = "discrete"
    data = "codes"
    needs_tokenizer = "embeds the codes with a ViQTokenizer directory's head"
    online_parts = ("encoder", "head")
    online_visual = staticmethod(quantized_input)

    def build_visual(self, cfg: Config, llm_config) -> CodeVisualInput:
        return code_input(cfg, llm_config.hidden_size)
