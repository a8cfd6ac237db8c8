"""What a training stage is: everything about one stage, in one object.

A stage says which model parts it builds (through the provider) and which it never trains,
which data its rows come from, its loss terms as local sums read from a chunk's typed output,
the count each sum is normalised by (known before the forward pass, so normalisation is
global over ranks and micro-batches) and their weights, its schedules, what its checkpoints
hold that inference does without, and what it needs of the config. The trainer, inference,
export and the tools ask the stage; nothing outside a stage's module branches on its name.
training/objective.py turns the terms into Megatron-Core's loss contract.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from viq_megatron.config import Config, require
from viq_megatron.data.multimodal import PackedBatch
from viq_megatron.models.flops import llm_forward_flops, vit_forward_flops
from viq_megatron.models.multimodal import MultimodalOutput, VisionLanguageModel, VisualOutput
from viq_megatron.models.provider import build_llm_from_config, llm_arch, load_prefixed, tokenizer_config

# Where a stage's rows come from: conversations with image files, or the offline token files of
# tools/preprocess_images.py holding ViQ codes or a frozen encoder's features.
DataKind = Literal["conversations", "codes", "features"]


class Stage:
    """One stage of training. Subclasses set the class attributes and build their model in
    `__init__` (this rank's pipeline chunks in `chunks`, the loss weights in `weights`)."""

    name: ClassVar[str]
    data: ClassVar[DataKind] = "conversations"
    # Rows also carry each image's fixed-resolution square view (stage 1's teacher reads it).
    teacher_images: ClassVar[bool] = False
    # Module prefixes the stage never trains (train.freeze adds more).
    frozen: ClassVar[tuple[str, ...]] = ()
    # An LLM that answers questions (evaluation, export to Hugging Face).
    answers: ClassVar[bool] = True

    chunks: list[MegatronModule]  # this rank's pipeline chunks (one without pipeline parallelism)
    weights: dict[str, float]  # objective = sum of weight * global mean, in this order

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """What the stage needs of the config, beyond config.py's own rules: a ConfigError naming
        the key."""
        require(
            cfg.train.pixel_weight == 0,
            "train.pixel_weight",
            "draws the stage-2 head's codes: needs train.stage stage2 and model.decoder",
        )

    def loss_terms(self, batch: PackedBatch, output: Any) -> dict[str, torch.Tensor]:
        """The local loss sums a chunk's output holds: {name: sum}."""
        raise NotImplementedError

    def counts(self, batch: PackedBatch) -> dict[str, float]:
        """What each of the sums is divided by (summed over the global batch)."""
        raise NotImplementedError

    def on_step(self, step: int) -> dict:
        """Before training step `step`: schedules that change the model (module state, so that
        checkpoints hold it); returns extra metrics to log."""
        return {}

    def flops(self, batch: PackedBatch) -> float:
        """Counted FLOPs of a training step on `batch` (for MFU)."""
        return 0.0

    def after_init_from(self) -> None:
        """After train.init_from loaded the weights shared with an earlier stage."""

    @classmethod
    def inference_model(cls, cfg: Config, online: bool) -> tuple[MegatronModule, Config, tuple[str, ...]]:
        """(the model to load a checkpoint of this stage into, without training-only parts; the
        config its visual input reads images with; key prefixes the checkpoint need not hold).
        `online`: questions come with images (else as offline codes)."""
        return cls(cfg).chunks[0], cfg, ()


def distillation(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image loss between pooled features [images, hidden], summed over images."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).sum()
    return F.mse_loss(student.float(), teacher.float(), reduction="none").mean(-1).sum()


class CaptionStage(Stage):
    """A visual input feeding the LLM, trained by the caption loss (on the LLM's last pipeline
    stage). Subclasses choose the visual input (`build_visual`) and may add, on the first stage,
    self-distillation of the visual features' pooled vector toward `distill_target` and terms of
    their own (`visual_terms`, counted by `visual_counts`, weighted by `visual_weights`)."""

    visual_weights: dict[str, float] = {}

    def __init__(self, cfg: Config):
        self.cfg = cfg
        llm = build_llm_from_config(cfg)
        # Only the first pipeline stage runs the visual input (and a decoder beside it).
        self.visual = self.build_visual(cfg, llm[0].config) if llm[0].pre_process else None
        self.decoder = self.build_decoder(cfg) if llm[0].pre_process else None
        self.chunks = [VisionLanguageModel(self.visual, chunk, self.decoder) for chunk in llm]
        self.weights = {
            "caption": 1.0,
            "distill": cfg.train.distill_weight,
            "reconstruct": cfg.train.reconstruct_weight,
            **self.visual_weights,
        }
        self._arch = llm_arch(cfg)

    def build_visual(self, cfg: Config, llm_config) -> MegatronModule:
        raise NotImplementedError

    def build_decoder(self, cfg: Config) -> MegatronModule | None:
        return None

    def distill_target(self, output: VisualOutput, batch: PackedBatch) -> torch.Tensor | None:
        """The pooled features (one row per image) the visual features are pulled toward; None:
        no distillation."""
        return None

    def visual_terms(self, output: VisualOutput, batch: PackedBatch) -> dict[str, torch.Tensor]:
        return {}

    def visual_counts(self, batch: PackedBatch) -> dict[str, float]:
        return {}

    def loss_terms(self, batch: PackedBatch, output: MultimodalOutput) -> dict[str, torch.Tensor]:
        terms = {}
        if output.token_losses is not None:
            terms["caption"] = (output.token_losses * batch.loss_mask.to(output.token_losses.device)).sum()
        if output.visual is not None:
            with torch.no_grad():
                target = self.distill_target(output.visual, batch)
            if target is not None:
                student = self.visual.pool(output.visual.features, batch.images.cu_seqlens)
                terms["distill"] = distillation(student, target, self.cfg.train.distill_loss)
                terms.update(self.visual_terms(output.visual, batch))
        return terms

    def counts(self, batch: PackedBatch) -> dict[str, float]:
        images = float(batch.images.num_images) if batch.images is not None else 0.0
        tokens = float(batch.images.num_tokens) if batch.images is not None else 0.0
        return {
            "caption": float(batch.num_loss_tokens),
            "distill": images,
            "reconstruct": tokens,
            **self.visual_counts(batch),
        }

    def flops(self, batch: PackedBatch) -> float:
        """LLM forward + backward (3x forward); the encoder's forward, and its backward when it trains."""
        total = 3 * llm_forward_flops(self._arch, (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist())
        encoder = getattr(self.visual, "encoder", None)
        if encoder is not None and batch.images is not None:
            trained = any(p.requires_grad for p in encoder.parameters())
            lengths = (batch.images.cu_seqlens[1:] - batch.images.cu_seqlens[:-1]).tolist()
            total += (3 if trained else 1) * vit_forward_flops(self.cfg.model.encoder, lengths)
        return total


class OfflineStage(CaptionStage):
    """A caption stage that trains on offline token files which model.viq_tokenizer made (its
    codes, or its encoder's features): no image at training time. Inference reads questions with
    images through that tokenizer's `online_parts`, in the visual input `online_visual` builds."""

    needs_tokenizer: ClassVar[str]  # what the stage takes from the tokenizer (for the config error)
    online_parts: ClassVar[tuple[str, ...]]

    @staticmethod
    def online_visual(cfg: Config, llm_hidden_size: int) -> MegatronModule:
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        require(
            bool(cfg.model.viq_tokenizer),
            "model.viq_tokenizer",
            f"missing (the {cls.name} stage {cls.needs_tokenizer})",
        )

    @classmethod
    def inference_model(cls, cfg: Config, online: bool) -> tuple[MegatronModule, Config, tuple[str, ...]]:
        if not online:
            return super().inference_model(cfg, online)
        model, tokenizer_cfg = tokenizer_visual_model(cfg, cls.online_visual, cls.online_parts)
        return model, tokenizer_cfg, ("visual.",)  # the run's checkpoint holds what it trained (the projector)


def tokenizer_visual_model(cfg: Config, build_visual, parts: tuple[str, ...]) -> tuple[MegatronModule, Config]:
    """(an LLM whose visual input `build_visual(tokenizer config, LLM width)` reads images with
    model.viq_tokenizer's `parts` (their weights; a run's checkpoint then supplies what it trained),
    the tokenizer's config: its encoder, head and image rules made the codes or features)."""
    tokenizer_cfg, _, weights = tokenizer_config(cfg, cfg.model.viq_tokenizer)
    llm = build_llm_from_config(cfg)
    visual = build_visual(tokenizer_cfg, llm[0].config.hidden_size)
    for part in parts:
        load_prefixed(getattr(visual, part), weights, f"visual.{part}.")
    return VisionLanguageModel(visual, llm[0]), tokenizer_cfg
