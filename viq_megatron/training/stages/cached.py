"""The cached-features baseline: the continuous path with its frozen encoder's tokens stored
offline (tools/preprocess_images.py --features with model.viq_tokenizer, whose projector starts
the run, or train.init_from a stage-1 run's): like discrete training, no image and no encoder at
training time. Inference reads images through the tokenizer's encoder, then the run's projector."""

from __future__ import annotations

from viq_megatron.config import Config
from viq_megatron.models.multimodal import CachedFeatureVisualInput
from viq_megatron.models.provider import encoder_input, feature_input
from viq_megatron.training.stages.base import OfflineStage


class Cached(OfflineStage):
    name = "cached"
    data = "features"
    needs_tokenizer = "reads the features of a ViQTokenizer directory's encoder"
    online_parts = ("encoder",)
    online_visual = staticmethod(encoder_input)

    def build_visual(self, cfg: Config, llm_config) -> CachedFeatureVisualInput:
        return feature_input(cfg, llm_config)
