"""The multimodal model: a visual-input module feeding an LLM through packed sequences.

One assembly for every path. Only the visual-input module changes: stage 1 and the
continuous baseline use `EncoderVisualInput` (native-resolution ViT + projector),
stage 2 `QuantizedVisualInput` (+ the ViQ head), and discrete training on offline
codes `CodeVisualInput` (the head's per-patch decoding + projector, no image at all). It returns one LLM embedding per visual
token; they replace the placeholder slots of the text embeddings.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from viq_megatron.data.multimodal import PackedBatch
from viq_megatron.models.pooling import AttentionPooling
from viq_megatron.models.viq_head import ViQHead
from viq_megatron.models.vit import NativeResolutionViT, row_blocked


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

    def __init__(self, encoder: NativeResolutionViT, projector: Projector, teacher: NativeResolutionViT | None = None,
                 pooling: AttentionPooling | None = None):
        super().__init__(config=encoder.config)
        self.encoder = encoder
        self.projector = projector
        # Stage 1's frozen copy of the starting encoder, distilled toward at fixed resolution.
        # A module, so checkpoints keep it: a resumed run distils toward the same teacher.
        self.teacher = teacher.requires_grad_(False) if teacher is not None else None
        # An imported SigLIP's frozen attention-pooling head; without one, features are mean-pooled.
        self.pooling = pooling.requires_grad_(False) if pooling is not None else None
        self.last_features: torch.Tensor | None = None  # encoder tokens of the last batch (distillation)

    def pool(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """One feature vector per image [images, hidden] (what stage 1 distils)."""
        return self.pooling(tokens, cu_seqlens) if self.pooling is not None else mean_pool(tokens, cu_seqlens)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        self.last_features = self.encoder(batch.images)
        return self.projector(self.last_features)


class QuantizedVisualInput(MegatronModule):
    """Images -> encoder -> ViQ head (quantized) -> projector: the online discrete visual input."""

    def __init__(self, encoder: NativeResolutionViT, head: ViQHead, projector: Projector):
        super().__init__(config=encoder.config)
        self.encoder = encoder
        self.head = head
        self.projector = projector
        self.last_encoder_tokens: torch.Tensor | None = None
        self.last_features: torch.Tensor | None = None  # head output of the last batch (distillation)
        self.last_bottleneck: torch.Tensor | None = None  # [N, 4, d] before the quantizer (codebook stats)

    def pool(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return mean_pool(tokens, cu_seqlens)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        self.last_encoder_tokens = self.encoder(batch.images)
        self.last_features, self.last_bottleneck = self.head(self.last_encoder_tokens, batch.images)
        return row_blocked(self.projector, self.last_features)  # as ViQTokenizer.embed computes it


class CodeVisualInput(MegatronModule):
    """Offline ViQ codes -> the head's per-patch decoding -> projector: no image, no encoder.
    Computes exactly what QuantizedVisualInput feeds the LLM for the same codes."""

    def __init__(self, head: ViQHead, projector: Projector):
        super().__init__(config=head.config)
        self.head = head
        self.projector = projector

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        features = self.head.embed_codes(batch.codes.to(self.head.from_code.weight.device))
        return row_blocked(self.projector, features)


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
        self.visual_seconds = 0.0  # forward time of the visual input, for the throughput log

    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)  # activations from the previous pipeline stage

    # finalize_model_grads all-reduces a tied embedding's gradient between the first and last
    # pipeline stages; it asks the chunk for the weight.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.llm.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.llm.shared_embedding_or_output_weight()

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Per-token loss [T] on the last pipeline stage (next-token cross-entropy; mask it with
        batch.loss_mask), the hidden states [T, 1, hidden] for the next stage before it."""
        device = next(self.llm.parameters()).device
        embeddings = None  # after the first stage, the LLM reads its input tensor
        if self.pre_process:
            tokens = batch.tokens.to(device)[None]
            embeddings = self.llm.embedding(input_ids=tokens, position_ids=batch.position_ids.to(device)[None])
            if len(batch.visual_positions):
                start = time.perf_counter()
                visual = self.visual(batch).to(embeddings.dtype)
                if visual.is_cuda:
                    torch.cuda.synchronize()  # for the time breakdown of the throughput log
                self.visual_seconds += time.perf_counter() - start
                slots = batch.visual_positions.to(device)
                embeddings = embeddings.index_put((slots, torch.zeros_like(slots)), visual)
        cu_seqlens = batch.cu_seqlens.to(device)
        # max_seqlen must be the longest sample, not the row: RoPE positions restart per sample.
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                 max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen)
        output = self.llm(input_ids=None, position_ids=None, attention_mask=None, decoder_input=embeddings,
                          labels=batch.labels.to(device)[None], packed_seq_params=packed)
        return output[0] if self.post_process else output
