import math

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image

from viq_megatron.config import ImageConfig
from viq_megatron.data.images import ImageError, load_native_image, native_size, open_rgb, patchify

RULES = ImageConfig(min_pixels=64 * 64, max_pixels=512 * 512)


@pytest.mark.parametrize(
    "width,height",
    [
        (512, 512),  # already on the grid, inside the budget: unchanged
        (640, 427),  # landscape photo
        (3000, 300),  # wide
        (300, 3000),  # tall
        (20, 10),  # tiny: scaled up to the minimum
        (12000, 9000),  # huge: scaled down to the maximum
        (1, 150),  # thinner than a patch
    ],
)
def test_native_size_rules(width, height):
    w, h = native_size(width, height, 16, RULES.min_pixels, RULES.max_pixels)
    assert w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16
    assert w * h <= RULES.max_pixels
    if min(width, height) * RULES.min_pixels // max(width, height) >= 16 * 16:
        assert w * h >= RULES.min_pixels * 0.5  # area budget met up to grid snapping
    if min(w, h) > 16:  # aspect ratio kept up to one patch of rounding per side
        assert abs(math.log((w / h) / (width / height))) < math.log((min(w, h) + 16) / min(w, h))
    if RULES.min_pixels <= width * height <= RULES.max_pixels and width % 16 == 0 and height % 16 == 0:
        assert (w, h) == (width, height)


def test_native_size_scales_up_and_down():
    assert native_size(20, 10, 16, 64 * 64, 512 * 512)[0] > 20
    w, h = native_size(12000, 9000, 16, 64 * 64, 512 * 512)
    assert w * h > 0.8 * 512 * 512 and w / h == pytest.approx(12000 / 9000, rel=0.05)


def test_patchify_matches_a_direct_crop(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    patches = patchify(Image.fromarray(array), 16, [0.0] * 3, [1.0] * 3)
    assert patches.shape == (2 * 3, 16 * 16 * 3)
    for row in range(2):
        for col in range(3):
            crop = array[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16].astype(np.float32) / 255.0
            np.testing.assert_array_equal(patches[row * 3 + col].numpy(), crop.reshape(-1))


def test_normalisation():
    image = Image.new("RGB", (16, 16), (255, 0, 128))
    patches = patchify(image, 16, [0.5] * 3, [0.5] * 3).reshape(16, 16, 3)
    assert torch.allclose(patches[0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)


def test_load_native_image_grid(tmp_path):
    path = make_image(tmp_path / "wide.png", size=(300, 100))
    image = load_native_image(path, RULES, 16)
    assert image.source_size == (300, 100)
    assert image.patches.shape == (image.grid[0] * image.grid[1], 768)
    assert image.grid[1] > 2 * image.grid[0]


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = make_image(tmp_path / "rotated.jpg", size=(80, 40), exif=exif.tobytes())
    assert Image.open(path).size == (80, 40)
    assert open_rgb(path, RULES).size == (40, 80)


def test_modes_become_rgb(tmp_path):
    cmyk = make_image(tmp_path / "cmyk.jpg", mode="CMYK")
    assert open_rgb(cmyk, RULES).mode == "RGB"

    grey16 = Image.fromarray(np.full((20, 20), 49151, dtype=np.uint16))  # 3/4 of the 16-bit range
    grey16.save(tmp_path / "grey16.png")
    pixel = open_rgb(tmp_path / "grey16.png", RULES).getpixel((0, 0))
    assert pixel == (191, 191, 191)  # rescaled from 16 bits, not clipped to 255

    for values, expected in (
        (np.float32([[0.75, 0.25]]), [191, 64]),  # 0..1: the usual float range
        (np.float32([[191.0, 64.0]]), [191, 64]),
    ):  # a value above 1: 0..255
        Image.fromarray(np.repeat(values, 10, axis=0), "F").save(tmp_path / "float.tif")
        assert [open_rgb(tmp_path / "float.tif", RULES).getpixel((x, 0)) for x in (0, 1)] == [
            (v, v, v) for v in expected
        ]  # PIL's convert("RGB") makes 0..1 black
    Image.fromarray(np.full((20, 20), 49151, dtype=np.uint16)).save(tmp_path / "grey16.tif")
    assert open_rgb(tmp_path / "grey16.tif", RULES).getpixel((0, 0)) == (191, 191, 191)
    Image.fromarray(np.full((20, 20), np.nan, dtype=np.float32), "F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match="nan.tif: .*NaN or infinite pixel values"):
        open_rgb(tmp_path / "nan.tif", RULES)

    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.save(tmp_path / "transparent.png")
    assert open_rgb(tmp_path / "transparent.png", RULES).getpixel((0, 0)) == (255, 255, 255)

    palette = Image.new("P", (10, 10), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    palette.save(tmp_path / "palette.png")
    assert open_rgb(tmp_path / "palette.png", RULES).getpixel((0, 0)) == (10, 20, 30)


def bad_inputs(tmp_path):
    good = make_image(tmp_path / "good.jpg", size=(200, 150))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:600])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("this is not an image\n")
    strip = make_image(tmp_path / "strip.png", size=(1, 5000))
    return {
        truncated: "truncated or corrupt",
        empty: "empty file",
        text: "not a readable image",
        strip: "absurd size 1x5000",
        tmp_path / "missing.png": "no such file",
    }


def test_bad_images_one_line_error_naming_file(tmp_path):
    for path, reason in bad_inputs(tmp_path).items():
        with pytest.raises(ImageError) as e:
            load_native_image(path, RULES, 16)
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: ") and reason in message, message


def test_too_many_source_pixels(tmp_path):
    path = make_image(tmp_path / "big.png", size=(600, 500))
    rules = ImageConfig(min_pixels=64, max_pixels=1024, max_source_pixels=200_000)
    with pytest.raises(ImageError, match=r"big.png: absurd size 600x500 \(over 200000 pixels\)"):
        load_native_image(path, rules, 16)


def test_pil_image_input():
    image = Image.new("L", (40, 40), 7)
    loaded = load_native_image(image, RULES, 16)
    assert loaded.source == "<PIL image>" and loaded.grid[0] == loaded.grid[1]
