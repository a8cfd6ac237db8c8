"""tools/compare_runs.py: timings may differ between two runs, nothing else may."""

import json

from viq_megatron.cli.compare_runs import main


def write_run(root, loss: float, step_time: float, weights: bytes) -> None:
    (root / "stage1").mkdir(parents=True)
    rows = [{"step": 1, "split": "train", "loss": loss, "grad_norm": 2.0, "step_time_s": step_time, "mfu": 0.1}]
    (root / "stage1/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tokenizer").mkdir()
    (root / "tokenizer/model.safetensors").write_bytes(weights)


def test_timings_may_differ_and_nothing_else(tmp_path, capsys):
    write_run(tmp_path / "a", 1.5, 0.3, b"w")
    write_run(tmp_path / "b", 1.5, 0.9, b"w")
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "2 files compared: identical" in capsys.readouterr().out
    write_run(tmp_path / "c", 1.25, 0.3, b"v")
    (tmp_path / "c/extra.codebook.json").write_text("{}")
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "step 1 train loss: 1.5 vs 1.25" in out and "tokenizer/model.safetensors: the files differ" in out
    assert f"only in {tmp_path / 'c'}: extra.codebook.json" in out and "step_time_s" not in out
