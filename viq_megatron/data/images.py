"""Native-resolution images: decode, size to the patch grid, patchify.

An image keeps its aspect ratio. It is scaled only to fit the [min_pixels, max_pixels]
budget, and each side is snapped to a multiple of the patch size. Anything that cannot
be read is an `ImageError` whose one line names the file and the problem.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from viq_megatron.config import ImageConfig
from viq_megatron.runtime.errors import InputError

ImageSource = str | os.PathLike | Image.Image


class ImageError(InputError):
    """An image that cannot be used; the message is one line naming the file."""


@dataclass
class NativeImage:
    """One image cut into patches at its native-resolution size."""

    patches: torch.Tensor  # [grid_h * grid_w, patch * patch * 3], row-major over the grid
    grid: tuple[int, int]  # (grid_h, grid_w) in patches
    source: str
    source_size: tuple[int, int]  # (width, height) after EXIF orientation, before resizing

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def native_size(width: int, height: int, patch: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) with the aspect ratio kept, area in [min_pixels, max_pixels] where the
    patch grid allows, each side a positive multiple of `patch`."""

    def snap(side: float, rounding) -> int:
        return max(patch, int(rounding(side / patch)) * patch)

    w, h = snap(width, round), snap(height, round)
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        w, h = snap(width * scale, math.floor), snap(height * scale, math.floor)
    elif w * h < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        w, h = snap(width * scale, math.ceil), snap(height * scale, math.ceil)
    return w, h


def open_rgb(source: ImageSource, rules: ImageConfig) -> Image.Image:
    """Decodes a file (or takes a PIL image) to RGB with its EXIF orientation applied."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not a readable image (unknown or corrupt format)") from None
        except Image.DecompressionBombError:
            raise ImageError(f"{name}: absurd size (over PIL's decompression-bomb limit)") from None
        except OSError as e:
            raise ImageError(f"{name}: truncated or corrupt image data ({e})") from None
    width, height = image.size
    if width * height > rules.max_source_pixels:
        raise ImageError(f"{name}: absurd size {width}x{height} (over {rules.max_source_pixels} pixels)")
    if max(width, height) > rules.max_aspect_ratio * min(width, height):
        raise ImageError(f"{name}: absurd size {width}x{height} (aspect ratio over {rules.max_aspect_ratio:g})")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name}: truncated or corrupt image data ({e})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit and float grey: PIL's convert("RGB") clips at 255 instead of rescaling. Float
        # images are 0..1 (black..white), or 0..255 when a value exceeds 1.
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ValueError("NaN or infinite pixel values")
        if image.mode == "F":
            peak = 1.0 if array.max() <= 1.0 else 255.0
        else:
            peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite transparency onto white, the common viewer convention.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def patchify(image: Image.Image, patch: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """RGB image whose sides are multiples of `patch` -> [grid_h * grid_w, patch * patch * 3],
    each patch flattened as (row, column, channel)."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # [H, W, 3]
    array = (array - torch.tensor(mean)) / torch.tensor(std)
    height, width, _ = array.shape
    grid_h, grid_w = height // patch, width // patch
    return (
        array.reshape(grid_h, patch, grid_w, patch, 3)
        .permute(0, 2, 1, 3, 4)
        .reshape(grid_h * grid_w, patch * patch * 3)
    )


def to_native(image: Image.Image, rules: ImageConfig, patch: int, source: str) -> NativeImage:
    """An RGB image resized to its native-resolution grid and cut into patches."""
    width, height = native_size(image.width, image.height, patch, rules.min_pixels, rules.max_pixels)
    resized = image if (width, height) == image.size else image.resize((width, height), Image.Resampling.BICUBIC)
    return NativeImage(
        patchify(resized, patch, rules.mean, rules.std), (height // patch, width // patch), source, image.size
    )


def to_square(image: Image.Image, side: int, rules: ImageConfig, patch: int, source: str) -> NativeImage:
    """The fixed-resolution view a classic (non-native) encoder sees: squashed to side x side."""
    resized = image.resize((side, side), Image.Resampling.BICUBIC)
    return NativeImage(
        patchify(resized, patch, rules.mean, rules.std), (side // patch, side // patch), source, image.size
    )


def load_native_image(source: ImageSource, rules: ImageConfig, patch: int) -> NativeImage:
    """Decode, resize to the native-resolution grid, patchify."""
    return to_native(open_rgb(source, rules), rules, patch, _describe(source))


def native_patch_count(path: str | Path, rules: ImageConfig, patch: int) -> int:
    """Patches the image will take, from its header alone (no pixel decoding)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the sides
                width, height = height, width
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None
    w, h = native_size(width, height, patch, rules.min_pixels, rules.max_pixels)
    return (w // patch) * (h // patch)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def find_images(entries: list[str], allow_outside: bool = False) -> list[Path | ImageError]:
    """Files as listed; folders expanded to their image files (recursively, sorted). In a folder,
    a dangling symbolic link, or one that leads out of the folder (unless `allow_outside`), is an
    ImageError in its place: reported, never silently left out."""
    found: list[Path | ImageError] = []
    for entry in entries:
        folder = Path(entry)
        if not folder.is_dir():
            found.append(folder)  # a missing file is reported when it is loaded
            continue
        real_folder = os.path.realpath(folder)
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            target = os.path.realpath(path)
            if path.is_symlink() and not os.path.exists(target):
                found.append(ImageError(f"{path}: dangling symbolic link (to {os.readlink(path)})"))
            elif not allow_outside and os.path.commonpath([real_folder, target]) != real_folder:
                found.append(
                    ImageError(
                        f"{path}: symbolic link out of {folder} (to {target}); "
                        "allow links outside the folder to read it"
                    )
                )
            elif os.path.isfile(target):
                found.append(path)
    return found


def _describe(source: ImageSource) -> str:
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    return str(source)
