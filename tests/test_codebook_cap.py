"""The PCA cap of codebook usage (tools/codebook_cap.py): blocks as the codes see them, equal
blocks one code, and independent noise spread evenly over the grid."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image


def test_blocks_are_the_images_8x8_pixel_blocks():
    from viq_megatron.benchmarks.codebook_cap import pixel_blocks
    from viq_megatron.config import ImageConfig
    from viq_megatron.data.images import load_native_image

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    native = load_native_image(Image.fromarray(array), ImageConfig(min_pixels=256, max_pixels=48 * 32), 16)
    blocks = pixel_blocks(native, 16)
    assert native.grid == (2, 3) and blocks.shape == (24, 8 * 8 * 3)
    expected = {tuple(array[y : y + 8, x : x + 8].reshape(-1)) for y in range(0, 32, 8) for x in range(0, 48, 8)}
    # Loaded pixels are normalised per channel: map them back to bytes through the first block.
    mean, std = (torch.tensor(v) for v in (ImageConfig().mean, ImageConfig().std))
    values = (blocks.reshape(-1, 64, 3) * std + mean) * 255
    got = {tuple(b) for b in values.round().long().reshape(len(blocks), -1).tolist()}
    assert got == expected


def test_equal_blocks_share_a_code_and_noise_fills_the_grid():
    from viq_megatron.benchmarks.codebook_cap import pca_cap_codes
    from viq_megatron.models.codebook import codebook_summary
    from viq_megatron.models.quantizers import FSQ, FSQ_PRESETS

    fsq = FSQ(FSQ_PRESETS["16k"])
    flat = torch.cat([torch.full((500, 192), 0.3), torch.full((500, 192), -0.7)])
    assert len(pca_cap_codes(flat, fsq).unique()) == 2  # two distinct blocks, two codes
    noise = torch.randn(200_000, 192, generator=torch.Generator().manual_seed(0))
    codes = pca_cap_codes(noise, fsq)
    summary = codebook_summary(torch.bincount(codes, minlength=fsq.codebook_size).double(), fsq)
    # Independent components cut into equal bins: every code about equally likely.
    assert summary["codebook_usage"] > 0.99
    assert summary["codebook_perplexity"] > 0.95 * fsq.codebook_size
    for levels, histogram in zip(fsq.levels, summary["level_histograms"]):
        assert histogram == pytest.approx([1 / levels] * levels, abs=0.01)


def test_tool_reports_the_cap_beside_the_tokenizers_usage(tmp_path):
    """Two flat images with two colours in block-aligned halves: two distinct blocks, so a cap of
    2 codes; the tokenizer's usage is read as a share of it; a broken image is named and skipped."""
    from conftest import tiny_train_config

    from viq_megatron.tokenizer import ViQTokenizer

    head = "model.head={subtoken_size: 32, pre_layers: 1, subtoken_layers: 1, subtoken_ffn_size: 64, post_blocks: 1}"
    ViQTokenizer(tiny_train_config(tmp_path / "x", head), 64).save(tmp_path / "tok")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    halves = Image.new("RGB", (64, 32), (200, 30, 30))
    halves.paste((30, 30, 200), (32, 0, 64, 32))
    halves.save(tmp_path / "halves.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [
        {"image": name, "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
        for name in ("red.png", "halves.png", "broken.png", "red.png")
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "codes.json").write_text(json.dumps({"codebook_usage": 1 / 15360, "codebook_perplexity": 1.0}))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/codebook_cap.py"),
            *("--tokenizer", str(tmp_path / "tok"), "--input", str(tmp_path / "data.jsonl")),
            *("--codebook", str(tmp_path / "codes.json"), "--out", str(tmp_path / "cap.json")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "broken.png" in done.stderr
    report = json.loads((tmp_path / "cap.json").read_text())
    assert report["images"] == 3  # red twice, halves once
    assert report["cap"]["codebook_usage"] == pytest.approx(2 / 15360)
    assert report["usage_of_cap"] == pytest.approx(0.5)
    # 16 + 16 + 16 red blocks and 16 blue: the perplexity of a (3/4, 1/4) split.
    assert report["cap"]["codebook_perplexity"] == pytest.approx(
        math.exp(-(3 / 4 * math.log(3 / 4) + 1 / 4 * math.log(1 / 4)))
    )
    assert "of the cap" in done.stdout
