import random

import pytest
import torch

from viq_megatron.data.images import NativeImage
from viq_megatron.data.packing import PackedImages, greedy_pack


def test_greedy_pack_properties():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    packs = greedy_pack(lengths, 128)
    flat = sorted(i for pack in packs for i in pack)
    assert flat == list(range(len(lengths)))  # every sequence exactly once
    assert all(sum(lengths[i] for i in pack) <= 128 for pack in packs)
    assert all(pack == sorted(pack) for pack in packs)
    assert len(packs) <= 1.25 * sum(lengths) / 128 + 1  # first-fit decreasing stays near the bound
    assert packs == greedy_pack(lengths, 128)  # deterministic


def test_greedy_pack_exact_fit_and_overflow():
    assert greedy_pack([60, 40, 50, 50], 100) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="sequence 1 has 101 tokens"):
        greedy_pack([5, 101], 100)


def test_packed_images_layout():
    images = [
        NativeImage(torch.full((h * w, 3), float(i)), (h, w), f"im{i}", (w, h))
        for i, (h, w) in enumerate([(2, 3), (1, 1), (4, 2)])
    ]
    packed = PackedImages.from_images(images)
    assert packed.cu_seqlens.tolist() == [0, 6, 7, 15]
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.grids.tolist() == [[2, 3], [1, 1], [4, 2]]
    assert packed.max_seqlen == 8 and packed.num_tokens == 15
    for i, part in enumerate(packed.split(packed.patches)):
        assert torch.equal(part, images[i].patches)
