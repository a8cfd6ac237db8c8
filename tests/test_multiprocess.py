"""Multi-process checks, grouped into few torchrun launches (each costs ~10 s of imports)."""

import json
import math
import re

import pytest
import torch
from conftest import ROOT, make_image, torchrun
from hf_models import make_tiny_hf

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="two processes need two GPUs once CUDA is present",
)


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
    # The ViQ head: TP=2 differs from TP=1 only by the split inner sums of row-parallel layers.
    assert result["head_z_max_diff"] < 1e-5 and result["head_feature_max_diff"] < 1e-5
    assert result["head_codes_consistent"] and result["head_codes_equal_fraction"] > 0.99


def test_main_job_reports_grids_and_skips_bad_images(tmp_path):
    make_image(tmp_path / "wide.png", size=(320, 96))
    make_image(tmp_path / "tall.jpg", size=(90, 300), seed=1)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    result = torchrun(
        2,
        "-m",
        "viq_megatron.encode",
        "--config",
        "examples/encoder_tiny_cpu.yaml",
        f"data.images=[{tmp_path}]",
        "benchmark.timed_passes=1",
    )
    out = result.stdout + result.stderr
    assert re.search(r"wide.png +320x96 +-> +320x96 +grid +6x20 ", out), out  # on the grid already
    assert "tall.jpg" in out
    assert out.count(f"skipped {tmp_path}/text.jpg: not a readable image") == 1  # reported once
    assert f"skipped {tmp_path}/zero.png: empty file" in out
    assert "2 images in 1 packs" in out and "2 skipped" in out
    assert "throughput:" in out and "tp=2" in out


def test_resume_equals_uninterrupted_run(tmp_path):
    result_file = tmp_path / "single.json"
    torchrun(1, str(ROOT / "tests/workers/train_checks.py"), "single", str(result_file), str(tmp_path))
    result = json.loads(result_file.read_text())
    assert len(result["straight"]) == 4 and result["resumed_from"] == 2
    assert result["resumed"] == result["straight"]  # same losses, bit for bit
    # ... with rows built in DataLoader workers, resumed mid-epoch (step 2 of 4 one-row steps).
    assert result["num_workers"] >= 1 and result["rows_per_epoch"] > 2
    # No host read of a computed tensor in the forward/backward of a step (stage 2: caption,
    # distillation, pixel losses, codebook statistics); one when a logged step is read (steps 2, 4).
    assert result["schedule_reads"] == [0, 0, 0, 0] and result["logged_step_reads"] == [1, 1]
    # Faults: a NaN loss skips its update and is counted; two in a row stop the job with a clear
    # message; a checkpoint write dying halfway leaves the previous one as the latest, loadable.
    assert result["nan_skipped"] == 1.0 and result["nan_counted"] == 1.0 and result["nan_loss_logged"]
    assert result["nan_step_left_weights"]  # unchanged by the NaN step, changed by the next one
    assert "2 steps in a row with a non-finite loss" in result["stopped_message"]
    assert result["save_failed"] and result["latest"] == "step_000002" and result["reloaded_step"] == 2
    # The stage chain ran through the same loop and its checkpoints fed each next stage.
    assert len(result["fsq_losses"]) == 2 and all(l > 0 for l in result["fsq_losses"])
    codebook = result["codebook"]
    levels = [8, 8, 8, 6, 5]  # the 16k preset
    assert [len(h) for h in codebook["level_histograms"]] == levels
    assert all(abs(sum(h) - 1) < 1e-3 for h in codebook["level_histograms"])
    seen, used = codebook["codes_seen"], codebook["codebook_usage"] * math.prod(levels)
    assert seen > 0 and seen % 4 == 0  # 2x2 codes per patch
    assert abs(used - round(used)) < 1e-6 and 1 <= round(used) <= min(seen, math.prod(levels))
    # The perplexity exp(H) of the code histogram, against what the per-level histograms allow:
    # H is at least the largest per-level entropy and at most their sum; exp(H) is at most the
    # number of codes used, and equals it when every code seen was seen once. (The histograms
    # are rounded to 4 decimals: entropies within 0.02.)
    log_perplexity = math.log(codebook["codebook_perplexity"])
    entropies = [-sum(p * math.log(p) for p in h if p > 0) for h in codebook["level_histograms"]]
    assert max(entropies) - 0.02 <= log_perplexity <= min(sum(entropies) + 0.02, math.log(round(used)) + 1e-9)
    if round(used) == seen:
        assert abs(log_perplexity - math.log(seen)) < 1e-9
    assert len(result["decoder_losses"]) == 2 and all(math.isfinite(l) for l in result["decoder_losses"])
    assert result["tokenizer_names_match"] and result["tokenizer_differs"] == []  # the export holds the runs' weights
    assert result["frozen_visual_differs"] == []  # frozen through the decoder stage, bit for bit
    # The encoder probe's 2-1 row reads s2_1's head (not the tokenizer's later one) as the stage computes it.
    assert result["linf_probe_features_match"] and result["linf_probe_features_not_2_2s"]


def test_data_parallel_and_tensor_parallel(tmp_path):
    """DP=2 (1 micro-batch each) vs DP=1 (2 micro-batches): same global batch, same losses.
    TP=2 LLM logits, from pre-written shards and from shards cut at load, vs transformers."""
    import torch
    from test_llm import hf_logits

    from viq_megatron.models.pretrained import import_hf_llm

    checkpoints = []
    for kind, shards in (("llama", 2), ("qwen2", 1)):
        hf_dir = make_tiny_hf(kind, tmp_path / f"hf_{kind}")
        checkpoint = tmp_path / f"ours_{kind}"
        import_hf_llm(hf_dir, checkpoint, tensor_parallel=shards)
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
        torch.save({"ids": ids, "logits": hf_logits(hf_dir, ids)}, checkpoint / "reference_logits.pt")
        checkpoints.append(str(checkpoint))
    assert (tmp_path / "ours_llama/tp2/rank1.safetensors").is_file()

    single_file = tmp_path / "single.json"
    torchrun(1, str(ROOT / "tests/workers/train_checks.py"), "dp1", str(single_file), str(tmp_path))
    result_file = tmp_path / "parallel.json"
    torchrun(2, str(ROOT / "tests/workers/train_checks.py"), "parallel", str(result_file), str(tmp_path), *checkpoints)
    result = json.loads(result_file.read_text())
    dp1 = json.loads(single_file.read_text())["dp1"]
    assert len(result["dp2"]) == 3
    # plain and sharded optimizer; the resumed run logs steps 1-2, then 3 after resuming
    for losses in (result["dp2"], result["dp2_distributed_optimizer"], result["dp2_distributed_optimizer_resumed"]):
        assert len(losses) == 3
        for a, b in zip(losses, dp1):
            assert abs(a - b) < 1e-5 * max(1.0, abs(b)), (losses, dp1)
    # Megatron-Core's per-token normalisation of each stage's objective: DP=2 == 2 micro-batches.
    single = json.loads(single_file.read_text())
    for stage in ("stage2", "decoder"):
        losses, expected = result[f"dp2_{stage}"], single[f"dp1_{stage}"]
        assert len(losses) == 3 and len(set(losses)) == 3, stage  # the objective moves
        for a, b in zip(losses, expected):
            assert abs(a - b) < 1e-5 * max(1.0, abs(b)), (stage, losses, expected)
    for checkpoint in checkpoints:
        assert result[checkpoint] < 1e-4, checkpoint
