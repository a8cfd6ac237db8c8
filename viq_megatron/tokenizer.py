"""ViQTokenizer: images <-> discrete codes <-> LLM input embeddings, standalone.

    from viq_megatron import ViQTokenizer
    tok = ViQTokenizer.load("tokenizer_dir")
    encoded = tok.encode(["photo.jpg", pil_image])    # codes [H/8, W/8] per image + resized size
    embeddings = tok.embed([e.codes for e in encoded])  # [patches, llm_hidden] per image, from codes alone
    images = tok.decode([e.codes for e in encoded])     # PIL images (needs a trained pixel decoder)
    features = tok.encoder_features(["photo.jpg"])      # [H/16, W/16, width]: the encoder's tokens
    tok.save("copy_dir")                                # safetensors + viq_tokenizer.json

A plain torch module on any device: no distributed runtime, no process group, no patch
(its Megatron-Core layers are built standalone, models/specs.py). The caller's random
generators are left as they were. The same module definitions serve training, export and
this class, so `embed(encode(x))` equals what the online model feeds the LLM, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from viq_megatron.config import Config
from viq_megatron.data.images import ImageError, ImageSource, load_native_image
from viq_megatron.data.packing import PackedImages
from viq_megatron.models.files import (
    TOKENIZER_CONFIG,
    WEIGHTS_FILE,
    TokenizerError,
    read_tokenizer_files,
    visual_config,
)
from viq_megatron.models.pixel_decoder import blocks_to_image, patch_major, raster_order
from viq_megatron.models.provider import build_pixel_decoder, quantized_input
from viq_megatron.models.vit import row_blocked


@dataclass
class EncodedImage:
    codes: torch.Tensor  # [H/8, W/8] int64, one code per 8x8 pixels of the resized image
    size: tuple[int, int]  # (width, height) of the resized image


@contextmanager
def callers_random_state_kept() -> Iterator[None]:
    """Building the tokenizer draws initial weights (replaced when it loads); the caller's Python,
    NumPy and torch generators are as they were afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class ViQTokenizer:
    def __init__(self, cfg: Config, llm_hidden_size: int):
        cfg.check_tokenizer()
        self.cfg = cfg
        self.llm_hidden_size = llm_hidden_size
        with callers_random_state_kept():
            self.visual = quantized_input(cfg, llm_hidden_size, standalone=True).eval()
            self.decoder = build_pixel_decoder(cfg, standalone=True).eval() if cfg.model.decoder is not None else None

    # ------------------------------------------------------------------ files
    def _config_dict(self) -> dict:
        return visual_config(self.cfg, self.llm_hidden_size, decoder=self.decoder is not None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"visual.{k}": v for k, v in self.visual.state_dict().items() if torch.is_tensor(v)}
        if self.decoder is not None:
            state.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items() if torch.is_tensor(v)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        expected = self.state_dict()
        for name, tensor in expected.items():
            if name not in state:
                raise TokenizerError(f"{source}: tensor {name} is missing")
            if state[name].shape != tensor.shape:
                raise TokenizerError(
                    f"{source}: tensor {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
                )
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise TokenizerError(f"{source}: unexpected tensor {unexpected[0]}")
        for prefix, module in (("visual.", self.visual), ("decoder.", self.decoder)):
            if module is not None:
                module.load_state_dict(
                    {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=False
                )

    def fingerprint(self) -> str:
        """A hash of everything that decides the codes: the configuration and every weight."""
        digest = hashlib.sha256(json.dumps(self._config_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_FILE))
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(self._config_dict(), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> ViQTokenizer:
        cfg, llm_hidden_size, state = read_tokenizer_files(directory)
        tokenizer = cls(cfg, llm_hidden_size)
        tokenizer.load_state_dict(state, str(Path(directory) / WEIGHTS_FILE))
        return tokenizer

    # ------------------------------------------------------------------ the product
    @property
    def device(self) -> torch.device:
        return self.visual.head.from_code.weight.device

    def _encoder_tokens(self, images: Sequence[ImageSource]) -> tuple[list, PackedImages, torch.Tensor]:
        """(the images at native resolution, packed, the encoder's tokens of the pack)."""
        loaded = [load_native_image(im, self.cfg.data.image, self.cfg.model.encoder.patch_size) for im in images]
        packed = PackedImages.from_images(loaded)
        return loaded, packed, self.visual.encoder(packed)

    @torch.no_grad()
    def encode(self, images: Sequence[ImageSource]) -> list[EncodedImage]:
        """Images at any resolution -> one code per 8x8 pixels of each native-resolution image."""
        loaded, packed, tokens = self._encoder_tokens(images)
        head = self.visual.head
        bottleneck = head.pre_quantization(tokens, packed)
        finite = torch.isfinite(bottleneck).flatten(1).all(1)
        if not finite.all():  # NaN would round to an arbitrary code
            bad = next(im for im, ok in zip(loaded, packed.split(finite)) if not ok.all())
            raise ImageError(f"{bad.source}: the tokenizer's features are NaN or infinite; no codes for it")
        indices = head.indices(bottleneck)
        out = []
        for image, part in zip(loaded, packed.split(indices)):
            gh, gw = image.grid
            grid = part.reshape(-1)[raster_order(gh, gw).to(part.device)].reshape(2 * gh, 2 * gw)
            out.append(
                EncodedImage(
                    grid.cpu(), (gw * self.cfg.model.encoder.patch_size, gh * self.cfg.model.encoder.patch_size)
                )
            )
        return out

    @torch.no_grad()
    def encoder_features(self, images: Sequence[ImageSource]) -> list[torch.Tensor]:
        """Images at any resolution -> the encoder's tokens [grid_h, grid_w, width] per image, before
        the head: what a continuous model with this (frozen) encoder feeds its projector."""
        loaded, packed, all_tokens = self._encoder_tokens(images)
        out = []
        for image, tokens in zip(loaded, packed.split(all_tokens)):
            if not torch.isfinite(tokens).all():
                raise ImageError(f"{image.source}: the encoder's features are NaN or infinite")
            out.append(tokens.reshape(*image.grid, -1).cpu())
        return out

    def _patch_major(self, codes: torch.Tensor) -> torch.Tensor:
        fh, fw = codes.shape
        if fh % 2 or fw % 2:
            raise ValueError(f"a code grid has even sides (2x2 codes per patch), got {fh}x{fw}")
        return patch_major(codes.cpu(), fh // 2, fw // 2)

    @torch.no_grad()
    def embed(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Code grids -> LLM input embeddings [patches, llm_hidden] each (one per 16x16 patch)."""
        out = []
        for grid in codes:
            features = self.visual.head.embed_codes(self._patch_major(grid).to(self.device))
            out.append(row_blocked(self.visual.projector, features))
        return out

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor]) -> list[Image.Image]:
        """Code grids -> images (the pixel decoder's reconstruction)."""
        if self.decoder is None:
            raise RuntimeError("this tokenizer has no pixel decoder (export one with --decoder-checkpoint)")
        head, rules = self.visual.head, self.cfg.data.image
        out = []
        for grid in codes:
            quantized = head.quantizer.fsq.indices_to_codes(self._patch_major(grid).to(self.device))
            subtokens = row_blocked(
                head.from_code, quantized.reshape(-1, quantized.shape[-1]).to(head.from_code.weight.dtype)
            )
            patch_grid = torch.tensor([[grid.shape[0] // 2, grid.shape[1] // 2]])
            pixels = blocks_to_image(self.decoder(subtokens, patch_grid), tuple(patch_grid[0].tolist())).float()
            std, mean = (torch.tensor(v, device=pixels.device)[:, None, None] for v in (rules.std, rules.mean))
            pixels = pixels * std + mean
            array = (pixels.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            out.append(Image.fromarray(np.ascontiguousarray(array), "RGB"))
        return out
