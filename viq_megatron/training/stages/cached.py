"""The cached-features baseline: the continuous path with its frozen encoder's tokens stored
offline (tools/preprocess_images.py --features with model.viq_tokenizer, whose projector starts
the run, or train.init_from a stage-1 run's): like discrete training, no image and no encoder at
training time. Inference reads images through the tokenizer's encoder, then the run's projector."""

from __future__ import annotations

from megatron.core.transformer.module import MegatronModule

from viq_megatron.config import Config, require
from viq_megatron.models.multimodal import CachedFeatureVisualInput
from viq_megatron.models.provider import encoder_input, feature_input
from viq_megatron.training.stages.base import CaptionStage, tokenizer_visual_model


class Cached(CaptionStage):
    name = "cached"
    data = "features"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        require(
            bool(cfg.model.viq_tokenizer),
            "model.viq_tokenizer",
            "missing (the cached stage reads the features of a ViQTokenizer directory's encoder)",
        )

    def build_visual(self, cfg: Config, llm_config) -> CachedFeatureVisualInput:
        return feature_input(cfg, llm_config)

    @classmethod
    def inference_model(cls, cfg: Config, online: bool) -> tuple[MegatronModule, Config, tuple[str, ...]]:
        if not online:
            return super().inference_model(cfg, online)
        model, tokenizer_cfg = tokenizer_visual_model(cfg, encoder_input, ("encoder",))
        return model, tokenizer_cfg, ("visual.",)  # the run's checkpoint holds the projector
