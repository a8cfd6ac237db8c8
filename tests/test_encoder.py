"""The native-resolution ViT in one process: packing invariance and position embeddings."""

import numpy as np
import pytest
import torch
from conftest import make_image, tiny_config

from viq_megatron.data.images import load_native_image
from viq_megatron.data.packing import PackedImages
from viq_megatron.models.provider import build_encoder


@pytest.fixture(scope="module")
def encoder(megatron_world):
    torch.manual_seed(0)
    model, _ = build_encoder(tiny_config())
    return model.eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    cfg = tiny_config()
    # Different sizes and aspect ratios, including one of only 2 patches.
    sizes = [(200, 120), (64, 64), (32, 16), (100, 260), (160, 160)]
    return [
        load_native_image(make_image(folder / f"{i}.png", size=s, seed=i), cfg.data.image, 16)
        for i, s in enumerate(sizes)
    ]


def test_output_is_one_token_per_patch(encoder, images):
    with torch.no_grad():
        out = encoder(PackedImages.from_images(images))
    assert out.shape == (sum(im.num_patches for im in images), 64)
    assert torch.isfinite(out).all()


def assert_same(a, b, message):
    """Bitwise on CPU (the per-image attention path is exactly invariant there); GPU matmul
    kernels may be chosen by problem size, so there a tight tolerance stands in."""
    if a.device.type == "cpu":
        assert torch.equal(a, b), message
    else:
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), message


def test_packing_invariance(encoder, images):
    """An image's tokens are identical alone or packed with images of other sizes, in any order."""
    with torch.no_grad():
        alone = [encoder(PackedImages.from_images([im])) for im in images]
        packed = PackedImages.from_images(images)
        together = packed.split(encoder(packed))
        order = [3, 0, 4, 2, 1]
        shuffled = PackedImages.from_images([images[i] for i in order])
        reordered = shuffled.split(encoder(shuffled))
    assert images[2].num_patches == 2
    for i in range(len(images)):
        assert_same(alone[i], together[i], f"image {i} differs when packed")
        assert_same(alone[order[i]], reordered[i], f"image {order[i]} differs in another order")


def test_images_do_not_attend_across_the_pack(encoder, images):
    """Changing one image's pixels leaves every other image's tokens untouched."""
    packed = PackedImages.from_images(images)
    changed = PackedImages.from_images(images)
    first = changed.split(changed.patches)[0]
    first += 1.0
    with torch.no_grad():
        before, after = packed.split(encoder(packed)), changed.split(encoder(changed))
    assert not torch.equal(before[0], after[0])
    for b, a in zip(before[1:], after[1:]):
        assert_same(b, a, "a change in one image reached another")


def _bilinear_reference(table: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling, written out by hand: [H, W, C] -> [out_h, out_w, C]."""
    in_h, in_w, _ = table.shape

    def coords(n_out, n_in):
        x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        x = np.clip(x, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, x - lo

    y0, y1, wy = coords(out_h, in_h)
    x0, x1, wx = coords(out_w, in_w)
    top = table[y0][:, x0] * (1 - wx)[None, :, None] + table[y0][:, x1] * wx[None, :, None]
    bottom = table[y1][:, x0] * (1 - wx)[None, :, None] + table[y1][:, x1] * wx[None, :, None]
    return top * (1 - wy)[:, None, None] + bottom * wy[:, None, None]


def test_position_embedding_is_interpolated_not_cropped(encoder):
    side = encoder.position_grid
    table = encoder.position_embedding.detach().reshape(side, side, -1)
    same = encoder.position_embeddings(torch.tensor([[side, side]]))
    assert torch.allclose(same, table.reshape(side * side, -1), atol=1e-6)

    grid_h, grid_w = 2 * side, 3 * side  # upsampled: bilinear, matches the hand-written reference
    resized = encoder.position_embeddings(torch.tensor([[grid_h, grid_w]])).reshape(grid_h, grid_w, -1)
    expected = _bilinear_reference(table.cpu().numpy().astype(np.float64), grid_h, grid_w)
    np.testing.assert_allclose(resized.detach().cpu().numpy(), expected, atol=1e-5)

    small = encoder.position_embeddings(torch.tensor([[side // 2, side // 2]])).reshape(side // 2, side // 2, -1)
    crop = table[: side // 2, : side // 2]
    assert not torch.allclose(small, crop, atol=1e-3)  # downsampled over the whole grid, not cropped
    assert torch.allclose(small.mean((0, 1)), table.mean((0, 1)), atol=2e-3)


def test_gradients_reach_every_parameter(encoder, images):
    encoder.zero_grad(set_to_none=True)
    encoder.train()
    encoder(PackedImages.from_images(images[:2])).square().mean().backward()
    encoder.eval()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_flop_count_matches_torch_flop_counter(encoder, tmp_path):
    """The MFU numerator: our closed-form count vs torch's own count of the executed matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    from viq_megatron.config import ImageConfig
    from viq_megatron.data.images import load_native_image
    from viq_megatron.models.flops import vit_forward_flops

    rules = ImageConfig(min_pixels=256, max_pixels=65536)
    # 64 + 128 patches: no row padding, so every counted FLOP is a real one.
    packed = PackedImages.from_images(
        [
            load_native_image(make_image(tmp_path / "a.png", size=(128, 128)), rules, 16),
            load_native_image(make_image(tmp_path / "b.png", size=(256, 128)), rules, 16),
        ]
    )
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    # The math backend runs attention as plain matmuls, which the counter sees.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        encoder(packed)
    expected = vit_forward_flops(tiny_config().model.encoder, [64, 128])
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_init_method_std_sets_the_starting_weights(megatron_world):
    """`model.encoder.init_method_std` reaches Megatron's init (the attention's input projection)."""
    for std in (0.02, 0.2):
        torch.manual_seed(0)
        model, _ = build_encoder(tiny_config(f"model.encoder.init_method_std={std}"))
        weight = dict(model.named_parameters())["transformer.layers.0.self_attention.linear_qkv.weight"]
        assert weight.std().item() == pytest.approx(std, rel=0.05)
