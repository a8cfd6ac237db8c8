"""Multi-process checks, grouped into few torchrun launches (each costs ~10 s of imports)."""
import json
import re

import pytest
import torch

from conftest import ROOT, make_image, torchrun

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                reason="two processes need two GPUs once CUDA is present")


def test_tensor_parallel_matches_single_process(tmp_path):
    for i, size in enumerate([(200, 120), (32, 16), (100, 260)]):
        make_image(tmp_path / f"{i}.png", size=size, seed=i)
    result_file = tmp_path / "tp.json"
    torchrun(2, str(ROOT / "tests/workers/tensor_parallel.py"), str(result_file), str(tmp_path))
    result = json.loads(result_file.read_text())
    assert result["output_max_diff"] < 1e-5 * max(1.0, result["output_scale"])
    assert len(result["split_params"]) >= 8  # qkv, proj, fc1, fc2 weights and biases of 2 layers
    for name, diff in result["grad_relative_diff"].items():
        assert diff < 1e-5, f"gradient of {name} differs by {diff:.2e} of its largest entry"
    assert result["forked_streams_differ"] and result["shared_stream_agrees"]


def test_main_job_reports_grids_and_skips_bad_images(tmp_path):
    make_image(tmp_path / "wide.png", size=(320, 96))
    make_image(tmp_path / "tall.jpg", size=(90, 300), seed=1)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    result = torchrun(2, "-m", "viq_megatron.encode", "--config", "examples/encoder_tiny_cpu.yaml",
                      f"data.images=[{tmp_path}]", "benchmark.timed_passes=1")
    out = result.stdout + result.stderr
    assert re.search(r"wide.png +320x96 +-> +320x96 +grid +6x20 ", out), out  # on the grid already
    assert "tall.jpg" in out
    assert out.count(f"skipped {tmp_path}/text.jpg: not a readable image") == 1  # reported once
    assert f"skipped {tmp_path}/zero.png: empty file" in out
    assert "2 images in 1 packs" in out and "2 skipped" in out
    assert "throughput:" in out and "tp=2" in out
