"""Training stages: what each one builds, trains and freezes, and which losses it adds.

The loop (trainer.py) is the same for every stage; a stage only supplies its model and
its auxiliary losses through a `Stage`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from viq_megatron.config import Config
from viq_megatron.data.multimodal import PackedBatch
from viq_megatron.encode import build_encoder, params_dtype
from viq_megatron.models.hf_llm import load_llm_weights, read_arch
from viq_megatron.models.llm import build_llm
from viq_megatron.models.multimodal import EncoderVisualInput, Projector, VisionLanguageModel
from viq_megatron.models.specs import resolve_transformer_impl


@dataclass
class Stage:
    model: VisionLanguageModel
    # (model, batch) -> {"name": (local sum, count)}: auxiliary losses added to the caption loss,
    # each normalised by its global count and weighted by `aux_weights`.
    aux_losses: Callable[[VisionLanguageModel, PackedBatch], dict[str, tuple[torch.Tensor, float]]]
    aux_weights: dict[str, float]


def build_llm_from_config(cfg: Config):
    llm_cfg = cfg.model.llm
    arch = read_arch(llm_cfg.checkpoint) if llm_cfg.checkpoint else llm_cfg.arch
    impl = resolve_transformer_impl(cfg.model.transformer_impl)
    llm = build_llm(arch, cfg.parallel.tensor_model_parallel_size, params_dtype(cfg.model.params_dtype), impl)
    if llm_cfg.checkpoint:
        load_llm_weights(llm, llm_cfg.checkpoint)
    return llm.cuda() if torch.cuda.is_available() else llm


def pooled_per_image(tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean token of each image: [images, hidden]."""
    bounds = cu_seqlens.tolist()
    return torch.stack([tokens[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])


def distillation(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image loss between pooled features [images, hidden] (summed over images)."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).sum()
    return F.mse_loss(student.float(), teacher.float(), reduction="none").mean(-1).sum()


def build_stage1(cfg: Config) -> Stage:
    """Encoder + projector learn from a (frozen by default) pretrained LLM's caption loss,
    while a frozen fixed-resolution copy of the encoder anchors its pooled features."""
    llm = build_llm_from_config(cfg)
    encoder, _ = build_encoder(cfg)
    projector = Projector(cfg.model.encoder.hidden_size, llm.config.hidden_size, params_dtype(cfg.model.params_dtype))
    visual = EncoderVisualInput(encoder, projector.to(encoder.patch_embedding.weight.device))
    model = VisionLanguageModel(visual, llm)
    teacher, _ = build_encoder(cfg)  # megatron modules hold process groups: no deepcopy
    teacher.load_state_dict(encoder.state_dict())
    teacher.eval().requires_grad_(False)

    def aux_losses(model: VisionLanguageModel, batch: PackedBatch) -> dict[str, tuple[torch.Tensor, float]]:
        if batch.images is None or cfg.train.distill_weight == 0:
            return {}
        student = pooled_per_image(model.visual.last_features, batch.images.cu_seqlens)
        with torch.no_grad():
            target = pooled_per_image(teacher(batch.teacher_images), batch.teacher_images.cu_seqlens)
        return {"distill": (distillation(student, target, cfg.train.distill_loss), float(batch.images.num_images))}

    return Stage(model, aux_losses, {"distill": cfg.train.distill_weight})


STAGES = {"stage1": build_stage1}
