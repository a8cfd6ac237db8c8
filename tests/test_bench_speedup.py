"""tools/bench_speedup.py: the scaled shapes keep the real shapes' FLOP proportions on the rows
the bench packs, its guard refuses rows and shapes that do not, and a short run through the
Trainer reports every path (with a profile)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_speedup  # noqa: E402


def rows(length: int, image_patches: int, count: int = 2) -> list:
    """Packed rows as the bench lays them out: SAMPLES_PER_ROW samples of length / 4 tokens,
    one image of `image_patches` patches each."""
    per_sample = length // bench_speedup.SAMPLES_PER_ROW
    samples = bench_speedup.SAMPLES_PER_ROW
    return [SimpleNamespace(tokens=torch.zeros(length), visual_positions=torch.zeros(samples * image_patches),
                            cu_seqlens=torch.arange(samples + 1) * per_sample,
                            images=SimpleNamespace(cu_seqlens=torch.arange(samples + 1) * image_patches))
            for _ in range(count)]


def scaled_shapes(llm: str, length: int, w: int = 8, d: int = 4):
    """The bench's scaled and real shapes for one row length, as its main loop sets them, and
    the patches per image."""
    shape, real = bench_speedup.shapes(llm, w, d), bench_speedup.shapes(llm, 1, 1)
    seqlens = [length // 4] * 4
    grid_rows, grid_columns = bench_speedup.grid(round(seqlens[0] * bench_speedup.VISUAL_SHARE))
    bench_speedup.matched(shape, real, seqlens, [grid_rows * grid_columns] * 4)
    return shape, real, grid_rows * grid_columns


@pytest.mark.parametrize("llm", ["0.5b", "1.5b"])
@pytest.mark.parametrize("length", [512, 1024, 4096])
def test_scaled_shapes_keep_the_real_proportions(llm, length):
    shape, real, patches = scaled_shapes(llm, length)
    measured = bench_speedup.check_proportions(shape, real, rows(length, patches))
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
        bench_speedup.check_proportions(shape, real, rows(512, 64))
    shape["encoder"]["num_layers"] *= 2  # an encoder twice as deep as the ratio allows
    with pytest.raises(SystemExit, match="encoder_per_llm is"):
        bench_speedup.check_proportions(shape, real, rows(512, patches))


def test_a_short_run_through_the_trainer_reports_every_path(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_speedup.py"), "--llm", "0.5b", "--seq-lengths", "512",
         "--encoder", "frozen", "--steps", "1", "--warmup", "1", "--pause", "0", "--num-workers", "1",
         "--profile", str(tmp_path / "profile"), "--out", str(tmp_path / "out")], capture_output=True, text=True,
        timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads((tmp_path / "out" / "bench_speedup.json").read_text())
    assert result["encoder"] == "frozen" and abs(result["visual_share"] - 0.75) <= 0.02
    assert result["speedup"] == pytest.approx(result["continuous_s"] / result["discrete_s"])
    assert result["measured_ideal"] == pytest.approx(result["continuous_s"] / result["ideal_s"])
    assert sorted(result["step_times_s"]) == ["cached", "continuous_frozen", "discrete", "ideal"]
    assert result["cached_s"] == result["step_times_s"]["cached"][0]
    # Stored per patch: 4 int32 codes; the encoder's width in bf16.
    shape, _, patches = scaled_shapes("0.5b", 512)
    assert result["bytes_per_patch"] == {"discrete": 16, "cached": 2 * shape["encoder"]["hidden_size"]}
    assert all(len(times) == 1 and times[0] > 0 for times in result["step_times_s"].values())
    # Frozen, the encoder adds its forward to 3x the LLM's: the FLOP ideal is 1 + encoder/LLM / 3,
    # here counted by hand from the bench's shapes and nominal layout (4 samples of 128 tokens,
    # images of 96 patches).
    from viq_megatron.config import EncoderConfig, LLMArch
    from viq_megatron.models.flops import llm_forward_flops, vit_forward_flops

    by_hand = vit_forward_flops(EncoderConfig(**shape["encoder"]), [patches] * 4) / llm_forward_flops(
        LLMArch(**shape["arch"]), [128] * 4)
    assert result["flop_ideal"] - 1 == pytest.approx(by_hand / 3, rel=0.05)
    for path in ("continuous_frozen", "cached", "discrete", "ideal"):
        trace = json.loads((tmp_path / "profile" / f"0.5b_512_{path}.json").read_text())
        assert trace["traceEvents"], path
        assert "Self CPU" in (tmp_path / "profile" / f"0.5b_512_{path}.txt").read_text()
