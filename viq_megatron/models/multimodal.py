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
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from viq_megatron.data.multimodal import PackedBatch
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


class EncoderVisualInput(MegatronModule):
    """Images -> encoder tokens -> projector: the continuous visual input."""

    def __init__(self, encoder: NativeResolutionViT, projector: Projector):
        super().__init__(config=encoder.config)
        self.encoder = encoder
        self.projector = projector
        self.last_features: torch.Tensor | None = None  # encoder tokens of the last batch (distillation)

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
    def __init__(self, visual: MegatronModule, llm: GPTModel):
        super().__init__(config=llm.config)
        self.visual = visual
        self.llm = llm
        self.visual_seconds = 0.0  # forward time of the visual input, for the throughput log

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Per-token loss [T] (next-token cross-entropy; mask it with batch.loss_mask)."""
        device = self.llm.embedding.word_embeddings.weight.device
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
        loss = self.llm(input_ids=None, position_ids=None, attention_mask=None, decoder_input=embeddings,
                        labels=batch.labels.to(device)[None], packed_seq_params=packed)
        return loss[0]
