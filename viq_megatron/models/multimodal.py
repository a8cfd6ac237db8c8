"""The multimodal model: a visual-input module feeding an LLM through packed sequences.

One assembly for every path. Only the visual-input module changes: stage 1 and the
continuous baseline use `EncoderVisualInput` (native-resolution ViT + projector),
stage 2 `QuantizedVisualInput` (+ the ViQ head), discrete training on offline codes
`CodeVisualInput` (the head's per-patch decoding + projector, no image at all), and the
cached-features baseline `CachedFeatureVisualInput` (a frozen encoder's tokens stored offline +
projector). It returns one LLM embedding per visual token; they replace the placeholder slots
of the text embeddings.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule

from viq_megatron.data.multimodal import PackedBatch
from viq_megatron.models.llm import packed_rows
from viq_megatron.models.pooling import AttentionPooling
from viq_megatron.models.viq_head import ViQHead
from viq_megatron.models.vit import NativeResolutionViT, row_blocked
from viq_megatron.runtime.timing import PhaseTimer


@dataclass
class VisualOutput:
    """What a visual input computes for the packed images of a batch (N visual tokens)."""

    embeddings: torch.Tensor  # [N, LLM hidden]: they replace the placeholder slots
    features: torch.Tensor | None = None  # [N, C] what the projector reads (encoder tokens, or the head's output)
    encoder_tokens: torch.Tensor | None = None  # [N, C] the encoder's tokens, before the ViQ head
    bottleneck: torch.Tensor | None = None  # [N, 4, d] the head's vectors before the quantizer


@dataclass
class MultimodalOutput:
    token_losses: torch.Tensor | None  # [T] next-token cross-entropy, on the last pipeline stage
    hidden_states: torch.Tensor | None  # [T, 1, hidden] for the next pipeline stage, before the last
    visual: VisualOutput | None = None  # on the first pipeline stage, for a batch with images
    logits: torch.Tensor | None = None  # [T, vocab] full logits instead of losses (a batch without labels)


class Projector(torch.nn.Module):
    """Encoder width -> LLM width: Linear, GELU, Linear (LLaVA's mlp2x_gelu)."""

    def __init__(self, in_size: int, out_size: int, dtype: torch.dtype):
        super().__init__()
        self.fc1 = torch.nn.Linear(in_size, out_size, dtype=dtype)
        self.fc2 = torch.nn.Linear(out_size, out_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def mean_pool(tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean token of each image: [images, hidden]."""
    bounds = cu_seqlens.tolist()
    return torch.stack([tokens[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])])


class EncoderVisualInput(MegatronModule):
    """Images -> encoder tokens -> projector: the continuous visual input."""

    def __init__(
        self,
        encoder: NativeResolutionViT,
        projector: Projector,
        teacher: NativeResolutionViT | None = None,
        pooling: AttentionPooling | None = None,
    ):
        super().__init__(config=encoder.config)
        self.encoder = encoder
        self.projector = projector
        # Stage 1's frozen copy of the starting encoder, distilled toward at fixed resolution.
        # A module, so checkpoints keep it: a resumed run distils toward the same teacher.
        self.teacher = teacher.requires_grad_(False) if teacher is not None else None
        # An imported SigLIP's frozen attention-pooling head; without one, features are mean-pooled.
        self.pooling = pooling.requires_grad_(False) if pooling is not None else None

    def pool(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """One feature vector per image [images, hidden] (what stage 1 distils)."""
        return self.pooling(tokens, cu_seqlens) if self.pooling is not None else mean_pool(tokens, cu_seqlens)

    def forward(self, batch: PackedBatch) -> VisualOutput:
        features = self.encoder(batch.images)
        return VisualOutput(self.projector(features), features)


class QuantizedVisualInput(MegatronModule):
    """Images -> encoder -> ViQ head (quantized) -> projector: the online discrete visual input."""

    def __init__(self, encoder: NativeResolutionViT, head: ViQHead, projector: Projector):
        super().__init__(config=encoder.config)
        self.encoder = encoder
        self.head = head
        self.projector = projector

    def pool(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return mean_pool(tokens, cu_seqlens)

    def forward(self, batch: PackedBatch) -> VisualOutput:
        encoder_tokens = self.encoder(batch.images)
        features, bottleneck = self.head(encoder_tokens, batch.images)
        # row_blocked: as ViQTokenizer.embed computes it
        return VisualOutput(row_blocked(self.projector, features), features, encoder_tokens, bottleneck)


class CodeVisualInput(MegatronModule):
    """Offline ViQ codes -> the head's per-patch decoding -> projector: no image, no encoder.
    Computes exactly what QuantizedVisualInput feeds the LLM for the same codes."""

    def __init__(self, head: ViQHead, projector: Projector):
        super().__init__(config=head.config)
        self.head = head
        self.projector = projector

    def forward(self, batch: PackedBatch) -> VisualOutput:
        features = self.head.embed_codes(batch.codes.to(self.head.from_code.weight.device))
        return VisualOutput(row_blocked(self.projector, features), features)


class CachedFeatureVisualInput(MegatronModule):
    """Offline encoder tokens (a frozen encoder's, stored in bf16) -> projector: no image, no
    encoder. Computes what EncoderVisualInput feeds the LLM for the same images, up to the
    features' bf16 rounding."""

    def __init__(self, projector: Projector, config):
        super().__init__(config=config)
        self.projector = projector

    def forward(self, batch: PackedBatch) -> VisualOutput:
        weight = self.projector.fc1.weight
        features = batch.features.to(weight.device, non_blocking=True).to(weight.dtype)
        return VisualOutput(self.projector(features), features)


class VisionLanguageModel(MegatronModule):
    """A visual input and an LLM; under pipeline parallelism one chunk of it: the visual input
    (and a pixel decoder, where one trains) lives with the LLM's first stage (None elsewhere)."""

    def __init__(self, visual: MegatronModule | None, llm: GPTModel, decoder: MegatronModule | None = None):
        super().__init__(config=llm.config)
        self.visual = visual if llm.pre_process else None
        # Stage 2's pixel decoder, trained beside the head on its codes (with the visual input).
        self.decoder = decoder if llm.pre_process else None
        self.llm = llm
        self.pre_process, self.post_process = llm.pre_process, llm.post_process
        self.model_type = ModelType.encoder_or_decoder  # read by the pipeline schedules
        self.phase_timer: PhaseTimer | None = None  # times the visual input for the throughput log

    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)  # activations from the previous pipeline stage

    # finalize_model_grads all-reduces a tied embedding's gradient between the first and last
    # pipeline stages; it asks the chunk for the weight.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.llm.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.llm.shared_embedding_or_output_weight()

    def forward(self, batch: PackedBatch, visual: VisualOutput | None = None) -> MultimodalOutput:
        """The LLM's per-token loss [T] on the last pipeline stage (next-token cross-entropy; mask
        it with batch.loss_mask), or for a batch without labels its full logits [T, vocab]
        (gathered over tensor-parallel ranks: inference); its hidden states [T, 1, hidden] for the
        next stage before it; beside it, on the first stage, what the visual input computed
        (`visual`: computed already, for the same images)."""
        device = next(self.llm.parameters()).device
        embeddings = None  # after the first stage, the LLM reads its input tensor
        positions = batch.position_ids.to(device, non_blocking=True)  # pinned by the DataLoader: no host wait
        if self.pre_process:
            tokens = batch.tokens.to(device, non_blocking=True)[None]
            embeddings = self.llm.embedding(input_ids=tokens, position_ids=positions[None])
            if len(batch.visual_positions):
                if visual is None:
                    with self.phase_timer.span("visual") if self.phase_timer is not None else nullcontext():
                        visual = self.visual(batch)
                slots = batch.visual_positions.to(device, non_blocking=True)
                embeddings = embeddings.index_put(
                    (slots, torch.zeros_like(slots)), visual.embeddings.to(embeddings.dtype)
                )
        packed = packed_rows(self.llm, batch.cu_seqlens.tolist(), positions)
        labels = None if batch.labels is None else batch.labels.to(device, non_blocking=True)[None]
        output = self.llm(
            input_ids=None,
            position_ids=None,
            attention_mask=None,
            decoder_input=embeddings,
            labels=labels,
            packed_seq_params=packed,
            runtime_gather_output=True if labels is None else None,
        )
        if not self.post_process:
            return MultimodalOutput(None, output, visual)
        if labels is None:
            return MultimodalOutput(None, None, visual, output[0])
        return MultimodalOutput(output[0], None, visual)
