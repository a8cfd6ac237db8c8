"""The training stages, one module each; a new stage is a new module and one line below.

stage = stage_for(cfg)   # the class train.stage names, after it checked the config
stage.data               # where its rows come from;  stage(cfg).chunks: its model
"""

from __future__ import annotations

from viq_megatron.config import Config, ConfigError
from viq_megatron.training.stages.base import CaptionStage, DataKind, Stage
from viq_megatron.training.stages.cached import Cached
from viq_megatron.training.stages.continuous import Continuous
from viq_megatron.training.stages.decoder import Decoder
from viq_megatron.training.stages.discrete import Discrete
from viq_megatron.training.stages.encoder_pretrain import EncoderPretrain
from viq_megatron.training.stages.stage1 import Stage1
from viq_megatron.training.stages.stage2 import Stage2

STAGES: dict[str, type[Stage]] = {
    stage.name: stage for stage in (EncoderPretrain, Stage1, Stage2, Decoder, Continuous, Discrete, Cached)
}


def stage_for(cfg: Config) -> type[Stage]:
    """The stage train.stage names, once it checked what it needs of `cfg` (ConfigError otherwise)."""
    stage = STAGES.get(cfg.train.stage)
    if stage is None:
        raise ConfigError(f"train.stage: {cfg.train.stage!r} is not one of {', '.join(map(repr, STAGES))}")
    stage.check_config(cfg)
    return stage


__all__ = ["STAGES", "CaptionStage", "DataKind", "Stage", "stage_for"]
