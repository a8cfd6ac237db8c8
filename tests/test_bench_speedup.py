"""tools/bench_speedup.py (viq_megatron/benchmarks/shapes.py): the scaled shapes keep the real
shapes' FLOP proportions on the rows the bench packs, its guard refuses rows and shapes that do
not, and a short run through the Trainer reports every path (with a profile)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

from viq_megatron.benchmarks import shapes


def rows(length: int, image_patches: int, count: int = 2) -> list:
    """Packed rows as the bench lays them out: SAMPLES_PER_ROW samples of length / 4 tokens,
    one image of `image_patches` patches each."""
    per_sample = length // shapes.SAMPLES_PER_ROW
    samples = shapes.SAMPLES_PER_ROW
    return [
        SimpleNamespace(
            tokens=torch.zeros(length),
            visual_positions=torch.zeros(samples * image_patches),
            cu_seqlens=torch.arange(samples + 1) * per_sample,
            images=SimpleNamespace(cu_seqlens=torch.arange(samples + 1) * image_patches),
        )
        for _ in range(count)
    ]


def scaled_shapes(llm: str, length: int, w: int = 8, d: int = 4):
    """The bench's scaled and real shapes for one row length, as its main loop sets them, and
    the patches per image."""
    shape, real = shapes.bench_shapes(llm, length, w, d)
    return shape, real, shapes.nominal_layout(length)[1][0]


@pytest.mark.parametrize("llm", ["0.5b", "1.5b"])
@pytest.mark.parametrize("length", [512, 1024, 4096])
def test_scaled_shapes_keep_the_real_proportions(llm, length):
    shape, real, patches = scaled_shapes(llm, length)
    measured = shapes.check_proportions(shape, real, rows(length, patches))
    assert abs(measured["visual_share"] - 0.75) <= 0.02
    for key in ("encoder_per_llm", "lm_head_share"):
        assert measured[f"{key}_bench"] == pytest.approx(measured[f"{key}_real"], rel=0.10), key
    # The reference itself, by hand from Qwen2.5's shapes (linear layers only; attention's
    # quadratic part lowers the share a little at longer rows): 0.5B 136M / 494M MACs per
    # token, 1.5B 233M / 1,544M.
    assert measured["lm_head_share_real"] == pytest.approx({"0.5b": 0.275, "1.5b": 0.151}[llm], rel=0.06)
    # The code embedding's share can only be matched to a whole block: within a factor of 2.
    assert 0.5 < measured["code_embedding_per_llm_bench"] / measured["code_embedding_per_llm_real"] < 2


def test_the_guard_refuses_rows_and_shapes_off_the_papers_setting():
    shape, real, patches = scaled_shapes("0.5b", 512)
    with pytest.raises(SystemExit, match="images fill 50.0% of the rows"):
        shapes.check_proportions(shape, real, rows(512, 64))
    shape["encoder"]["num_layers"] *= 2  # an encoder twice as deep as the ratio allows
    with pytest.raises(SystemExit, match="encoder_per_llm is"):
        shapes.check_proportions(shape, real, rows(512, patches))


def test_a_short_run_through_the_trainer_reports_every_path(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench_speedup.py"),
            "--llm",
            "0.5b",
            "--seq-lengths",
            "512",
            "--encoder",
            "frozen",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--pause",
            "0",
            "--num-workers",
            "1",
            "--profile",
            str(tmp_path / "profile"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads((tmp_path / "out" / "bench_speedup.json").read_text())
    assert result["encoder"] == "frozen" and abs(result["visual_share"] - 0.75) <= 0.02
    assert result["speedup"] == pytest.approx(result["continuous_s"] / result["discrete_s"])
    assert result["measured_ideal"] == pytest.approx(result["continuous_s"] / result["ideal_s"])
    assert sorted(result["step_times_s"]) == ["cached", "continuous_frozen", "discrete", "ideal"]
    assert result["cached_s"] == result["step_times_s"]["cached"][0]
    # Stored per patch: 4 int32 codes; the encoder's width in bf16.
    shape, _, _ = scaled_shapes("0.5b", 512)
    assert result["bytes_per_patch"] == {"discrete": 16, "cached": 2 * shape["encoder"]["hidden_size"]}
    assert all(len(times) == 1 and times[0] > 0 for times in result["step_times_s"].values())
    # Frozen, the encoder adds its forward to 3x the LLM's: the FLOP ideal is 1 + encoder/LLM / 3,
    # and the scaled shapes must keep the real shapes' encoder/LLM ratio (within the guard's 10%).
    # That ratio by hand, in multiply-adds, for the nominal rows (4 samples of 128 tokens, each
    # with an image of 96 patches): SO400M per patch 27 x (4 x 1152^2 + 2 x 1152 x 4304) +
    # attention 27 x 2 x 96 x 1152 + patch embedding 3 x 16^2 x 1152 = 417.9M; Qwen2.5-0.5B per
    # token 24 x (896 x (896 + 256) + 896^2 + 3 x 896 x 4864) + causal attention 24 x 128 x 896 +
    # LM head 896 x 151936 = 496.7M; 384 x 417.9M / (512 x 496.7M) = 0.631.
    assert result["flop_ideal"] - 1 == pytest.approx(0.631 / 3, rel=0.10)
    for path in ("continuous_frozen", "cached", "discrete", "ideal"):
        trace = json.loads((tmp_path / "profile" / f"0.5b_512_{path}.json").read_text())
        assert trace["traceEvents"], path
        assert "Self CPU" in (tmp_path / "profile" / f"0.5b_512_{path}.txt").read_text()
