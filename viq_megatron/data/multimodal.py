"""Multimodal training sequences: conversations with images, packed into fixed-length rows.

Each sample becomes text tokens with one slot per visual token (one per 16x16 patch of
its native-resolution image). Several samples share a packed row: `cu_seqlens` keeps
attention inside each sample, position ids restart per sample, labels never cross a
sample boundary, and the loss counts only the assistant's tokens. A placeholder that
expands into a thousand visual tokens is just a long slot: lengths are known before
packing, so a row never overflows.

The order of packed rows is a pure function of (seed, row index): resuming at step N
reads exactly the rows an uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from viq_megatron.config import AugmentConfig, ImageConfig
from viq_megatron.data.code_layout import patch_major
from viq_megatron.data.conversations import Sample
from viq_megatron.data.images import ImageError, NativeImage, native_patch_count, open_rgb, to_native, to_square
from viq_megatron.data.packing import PackedImages, greedy_pack
from viq_megatron.data.text import TextTokenizer, tokenize_conversation
from viq_megatron.data.token_dataset import ANSWER, CODES, FEATURES, GRID, TokenDataset, features_from_int32
from viq_megatron.runtime.errors import InputError

log = logging.getLogger(__name__)

# Samples are packed within windows of this many (shuffled) samples: near-optimal fill,
# and a row's content depends only on its window.
PACKING_WINDOW = 256


@dataclass
class EncodedSample:
    source: str
    token_ids: list[int]  # visual slots hold 0
    loss_flags: list[bool]  # True for the assistant's tokens
    visual_slots: list[int]  # positions of the visual tokens, image after image
    images: list[NativeImage]  # native resolution, for the encoder
    teacher_images: list[NativeImage]  # fixed square resolution, for the frozen teacher
    codes: list[torch.Tensor] = field(default_factory=list)  # offline ViQ codes [patches, 4] per image
    features: list[torch.Tensor] = field(default_factory=list)  # or offline encoder tokens [patches, width] bf16

    def __len__(self) -> int:
        return len(self.token_ids)


def augmented(image: Image.Image, augment: AugmentConfig, rng: random.Random) -> Image.Image:
    """A random view of the image at its own size (so its patch grid does not change): a crop of
    `augment.crop_scale` of its area with the same aspect ratio, mirrored half of the time."""
    scale = math.sqrt(rng.uniform(*augment.crop_scale))
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    view = image.crop((left, top, left + width, top + height))
    if view.size != image.size:
        view = view.resize(image.size, Image.Resampling.BICUBIC)
    mirror = augment.flip and rng.random() < 0.5
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else view


def encode_sample(
    sample: Sample,
    tokenizer: TextTokenizer,
    rules: ImageConfig,
    patch: int,
    teacher_side: int | None,
    generation_prompt: bool = False,
    augment: tuple[AugmentConfig, random.Random] | None = None,
) -> EncodedSample:
    """Decodes the sample's images and lays out its tokens; raises ImageError for a bad image.
    `teacher_side`: also the fixed-resolution square view (stage 1's teacher), else None.
    `generation_prompt`: lay out the conversation only up to where the next answer starts.
    `augment`: (what, random source): random views of the images (the patch grids stay)."""
    decoded = [open_rgb(path, rules) for path in sample.images]
    if augment is not None:
        decoded = [augmented(image, *augment) for image in decoded]
    images = [to_native(im, rules, patch, str(path)) for im, path in zip(decoded, sample.images)]
    teacher = (
        []
        if teacher_side is None
        else [to_square(im, teacher_side, rules, patch, str(path)) for im, path in zip(decoded, sample.images)]
    )
    ids, flags, slots = [], [], []
    for piece in tokenize_conversation(tokenizer, sample.turns, generation_prompt).pieces:
        if piece[0] == "image":
            n = images[piece[1]].num_patches
            slots.extend(range(len(ids), len(ids) + n))
            ids.extend([0] * n)
            flags.extend([False] * n)
        else:
            ids.extend(piece[1])
            flags.extend(piece[2])
    return EncodedSample(sample.source, ids, flags, slots, images, teacher)


def sample_length(sample: Sample, tokenizer: TextTokenizer, rules: ImageConfig, patch: int) -> int:
    """The sample's token count without decoding its images (header sizes only)."""
    rendered = tokenize_conversation(tokenizer, sample.turns)
    return rendered.num_text_tokens() + sum(native_patch_count(p, rules, patch) for p in sample.images)


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [T] int64
    labels: torch.Tensor | None  # [T] int64: the next token within the same sample (None: logits wanted)
    loss_mask: torch.Tensor  # [T] float: 1 where the label is an assistant token
    position_ids: torch.Tensor  # [T] int64, restarting at 0 for each sample
    cu_seqlens: torch.Tensor  # [samples + 1] int32
    visual_positions: torch.Tensor  # [V] int64: where the visual tokens go, image after image
    images: PackedImages | None  # native resolution, in the same image order
    teacher_images: PackedImages | None  # fixed resolution, same order
    sources: list[str]
    codes: torch.Tensor | None = None  # offline path: [V, 4] ViQ codes (4 per visual token), same order
    features: torch.Tensor | None = None  # cached-features path: [V, width] bf16 encoder tokens, same order
    skipped: list[str] = field(default_factory=list)  # samples of this row that could not be read, and why

    def pin_memory(self) -> PackedBatch:
        """Page-locked copies (the DataLoader calls this in its pinning thread): the copies to the
        GPU then run without blocking the host."""

        def pinned(images: PackedImages | None) -> PackedImages | None:
            return None if images is None else dataclasses.replace(images, patches=images.patches.pin_memory())

        tensors = {
            f.name: getattr(self, f.name).pin_memory()
            for f in dataclasses.fields(self)
            if torch.is_tensor(getattr(self, f.name))
        }
        return dataclasses.replace(
            self, **tensors, images=pinned(self.images), teacher_images=pinned(self.teacher_images)
        )

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def pack_samples(samples: Sequence[EncodedSample]) -> PackedBatch:
    tokens, labels, mask, positions, slots = [], [], [], [], []
    lengths = [0]
    for s in samples:
        offset = len(tokens)
        tokens += s.token_ids
        labels += s.token_ids[1:] + [0]
        mask += [float(f) for f in s.loss_flags[1:]] + [0.0]
        positions += range(len(s))
        slots += [offset + p for p in s.visual_slots]
        lengths.append(len(s))
    images = [im for s in samples for im in s.images]
    teacher = [im for s in samples for im in s.teacher_images]
    return PackedBatch(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.int64),
        loss_mask=torch.tensor(mask, dtype=torch.float32),
        position_ids=torch.tensor(positions, dtype=torch.int64),
        cu_seqlens=torch.cumsum(torch.tensor(lengths), 0).to(torch.int32),
        visual_positions=torch.tensor(slots, dtype=torch.int64),
        images=PackedImages.from_images(images) if images else None,
        teacher_images=PackedImages.from_images(teacher) if teacher else None,
        sources=[s.source for s in samples],
        codes=torch.cat([c for s in samples for c in s.codes]) if any(s.codes for s in samples) else None,
        features=torch.cat([f for s in samples for f in s.features]) if any(s.features for s in samples) else None,
    )


class PackedRows:
    """Samples of known lengths packed into rows of at most `seq_length` tokens, in an order
    that is a pure function of (seed, row index). Subclasses load a row's samples."""

    def __init__(self, lengths: Sequence[int], seq_length: int, seed: int, shuffle: bool):
        self.lengths, self.seq_length, self.seed, self.shuffle = list(lengths), seq_length, seed, shuffle
        self._epochs: dict[int, list[list[int]]] = {}
        self._rows_per_epoch: list[int] = []

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Sample indices of each packed row of one pass over the data."""
        if epoch not in self._epochs:
            order = list(range(len(self.lengths)))
            if self.shuffle:
                random.Random(f"{self.seed}-{epoch}").shuffle(order)
            rows = []
            for start in range(0, len(order), PACKING_WINDOW):
                window = order[start : start + PACKING_WINDOW]
                rows += [
                    [window[i] for i in row] for row in greedy_pack([self.lengths[i] for i in window], self.seq_length)
                ]
            self._epochs = {epoch: rows}  # one epoch in memory is enough for sequential reads
        return self._epochs[epoch]

    def row_indices(self, row: int) -> list[int]:
        """The samples of global row `row` (rows of epoch 0, then epoch 1, ...)."""
        epoch = 0
        while True:
            if epoch == len(self._rows_per_epoch):  # each epoch's packing is counted once
                self._rows_per_epoch.append(len(self.epoch_rows(epoch)))
            if row < self._rows_per_epoch[epoch]:
                return self.epoch_rows(epoch)[row]
            row -= self._rows_per_epoch[epoch]
            epoch += 1

    def rows_per_epoch(self) -> int:
        return len(self.epoch_rows(0))


class PackedConversationDataset(PackedRows):
    """Conversation samples (images decoded every time) packed into rows.

    Samples that cannot be used (too long, unreadable image) are reported and counted in
    `skipped`, never silently dropped.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenizer: TextTokenizer,
        rules: ImageConfig,
        patch: int,
        seq_length: int,
        teacher_side: int | None,
        seed: int,
        shuffle: bool = True,
        augment: AugmentConfig | None = None,
    ):
        self.tokenizer, self.rules, self.patch, self.teacher_side = tokenizer, rules, patch, teacher_side
        self.augment = augment if augment is not None and augment.active else None
        self.skipped: list[str] = []
        self.samples: list[Sample] = []
        lengths = []
        for sample in samples:
            try:
                length = sample_length(sample, tokenizer, rules, patch)
            except ImageError as e:
                self._skip(f"{sample.source}: {e}")
                continue
            if length > seq_length:
                self._skip(f"{sample.source}: {length} tokens do not fit data.seq_length={seq_length}")
                continue
            self.samples.append(sample)
            lengths.append(length)
        if not self.samples:
            files = sorted({s.source.rsplit(":", 1)[0] for s in samples}) or ["the data"]
            raise InputError(f"{', '.join(files)}: no usable samples ({len(self.skipped)} skipped, see the warnings)")
        super().__init__(lengths, seq_length, seed, shuffle)

    def _skip(self, reason: str) -> None:
        log.warning("skipped sample %s", reason)
        self.skipped.append(reason)

    def __getitem__(self, row: int) -> PackedBatch:
        """Row `row`, packed (in a DataLoader worker, or here). An image that fails to decode now
        is logged and listed in the batch's `skipped`, which the trainer counts."""
        encoded, skipped = [], []
        for k, i in enumerate(self.row_indices(row)):
            # A view depends on (seed, row, place in the row) only: a resumed run sees the same pixels.
            augment = None if self.augment is None else (self.augment, random.Random(f"{self.seed}-{row}-{k}"))
            try:
                encoded.append(
                    encode_sample(
                        self.samples[i], self.tokenizer, self.rules, self.patch, self.teacher_side, augment=augment
                    )
                )
            except ImageError as e:
                skipped.append(f"{self.samples[i].source}: {e}")
                log.warning("skipped sample %s", skipped[-1])
        if not encoded:
            raise InputError(f"row {row}: every sample was skipped ({skipped[-1]})")
        return dataclasses.replace(pack_samples(encoded), skipped=skipped)


class PackedTokenDataset(PackedRows):
    """Offline samples (text tokens + ViQ codes, or with `feature_width` encoder tokens of that
    width, written by tools/preprocess_images.py) packed into rows exactly as
    PackedConversationDataset packs the same samples: no image is decoded."""

    def __init__(self, prefix: str, seq_length: int, seed: int, shuffle: bool = True, feature_width: int | None = None):
        self.data, self.prefix, self.feature_width = TokenDataset(prefix), prefix, feature_width
        self.skipped: list[str] = []
        index = self.data.data.index
        sizes, modes = index.sequence_lengths.astype("int64"), index.sequence_modes
        if feature_width is None and (modes == FEATURES).any():
            raise InputError(
                f"{prefix}: holds encoder features (preprocess_images.py --features), which the cached "
                "stage reads; this stage reads ViQ codes"
            )
        if feature_width is not None and (modes == CODES).any():
            raise InputError(
                f"{prefix}: holds ViQ codes, which the discrete stage reads; the cached stage reads "
                "encoder features (preprocess_images.py --features)"
            )
        # Lengths from the index alone (no token is read): text tokens + one slot per patch, whose
        # 4 codes, or width bf16 features (two per int32), the files hold.
        per_patch = 4 if feature_width is None else feature_width // 2
        visual = (modes == CODES) | (modes == FEATURES)
        if feature_width is not None and (sizes[visual] % per_patch).any():
            raise InputError(
                f"{prefix}: encoder features of another width than the model's encoder "
                f"({feature_width}; written with another tokenizer?)"
            )
        per_sequence = np.where(visual, sizes // per_patch, np.where(modes == GRID, 0, sizes))
        bounds = self.data.documents
        totals = np.add.reduceat(per_sequence, bounds[:-1]) if len(per_sequence) else np.zeros(0, "int64")
        totals[bounds[1:] == bounds[:-1]] = 0  # empty documents
        lengths, self.indices = [], []
        for i, length in enumerate(totals.tolist()):
            if length > seq_length:
                self.skipped.append(f"{prefix}:{i}: {length} tokens do not fit data.seq_length={seq_length}")
                log.warning("skipped sample %s", self.skipped[-1])
                continue
            lengths.append(length)
            self.indices.append(i)
        if not lengths:
            raise InputError(f"{prefix}: no usable samples ({len(self.skipped)} do not fit data.seq_length)")
        self.samples = self.indices
        super().__init__(lengths, seq_length, seed, shuffle)

    def __getitem__(self, row: int) -> PackedBatch:
        return pack_samples(
            [
                offline_sample(self.data[self.indices[i]], f"{self.prefix}:{self.indices[i]}", self.feature_width)
                for i in self.row_indices(row)
            ]
        )


def offline_sample(sample, source: str, feature_width: int | None = None) -> EncodedSample:
    """A TokenSample (text tokens, patch grids and ViQ codes, or encoder features of
    `feature_width`) laid out as `encode_sample` lays out its conversation: one slot per patch,
    codes [patches, 4] (or features [patches, width]) per image, loss flags on answers."""
    ids, flags, slots, codes, features = [], [], [], [], []
    grid = None
    for mode, seq in sample.segments:
        if mode == GRID:
            grid = (int(seq[0]), int(seq[1]))
            slots.extend(range(len(ids), len(ids) + grid[0] * grid[1]))
            ids.extend([0] * (grid[0] * grid[1]))
            flags.extend([False] * (grid[0] * grid[1]))
        elif mode == CODES:
            codes.append(patch_major(torch.from_numpy(seq), *grid))
        elif mode == FEATURES:
            if feature_width is None:
                raise InputError(f"{source}: encoder features (preprocess_images.py --features), not ViQ codes")
            features.append(features_from_int32(seq, feature_width))
            if len(features[-1]) != grid[0] * grid[1]:
                raise InputError(f"{source}: {len(features[-1])} feature vectors for a {grid[0]}x{grid[1]} patch grid")
        else:
            ids.extend(int(v) for v in seq)
            flags.extend([mode == ANSWER] * len(seq))
    return EncodedSample(source, ids, flags, slots, [], [], codes, features)
