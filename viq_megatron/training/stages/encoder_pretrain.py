"""Encoder pretraining, the CPU stand-in for SigLIP2's own (its LocCa captioning part): the encoder
and a small captioning decoder, a randomly initialised LLM, learn together from scratch on
captions; nothing is frozen, and only the encoder is kept (tools/export_encoder.py writes it in
the format model.encoder.init_from loads). The model is the continuous one."""

from __future__ import annotations

from viq_megatron.config import Config, require
from viq_megatron.training.stages.continuous import Continuous


class EncoderPretrain(Continuous):
    name = "encoder_pretrain"
    answers = False  # its decoder captions; it is not an LLM to ask questions

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        require(
            cfg.model.llm is not None and cfg.model.llm.arch is not None,
            "model.llm.arch",
            "the captioning decoder learns from scratch beside the encoder: give its sizes, not a checkpoint",
        )
        require(not cfg.train.freeze, "train.freeze", "encoder pretraining trains every part: use []")
