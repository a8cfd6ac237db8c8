import json
import statistics

from viq_megatron.cli import compare_throughput


def write_log(path, step_times, visual):
    path.parent.mkdir(parents=True)
    lines = [{"step": 0, "split": "val", "loss": 3.0}]
    for k, t in enumerate(step_times):
        lines.append(
            {
                "step": k + 1,
                "split": "train",
                "loss": 2.0,
                "step_time_s": t,
                "data_time_s": 0.1 * t,
                "visual_time_s": visual * t,
                "llm_time_s": (0.8 - visual) * t,
                "optimizer_time_s": 0.1 * t,
                "samples_per_s": 8 / t,
                "tokens_per_s": 4096 / t,
                "tflops_per_device": 1.0 / t,
                "peak_memory_gib": 2.0,
            }
        )
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return path


def test_table_medians_speedup_and_plot(tmp_path, capsys):
    slow = write_log(tmp_path / "continuous/metrics.jsonl", [9.0, 2.0, 2.2, 1.8, 2.1], visual=0.3)
    fast = write_log(tmp_path / "discrete/metrics.jsonl", [7.0, 1.6, 1.5, 1.4, 1.5], visual=0.01)
    assert compare_throughput.main([str(slow), str(fast), "--skip", "1", "--plot", str(tmp_path / "t.png")]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    expected = statistics.median([2.0, 2.2, 1.8, 2.1]) / statistics.median([1.6, 1.5, 1.4, 1.5])
    assert f"{expected:.2f}x" in rows["discrete"] and "1.00x" in rows["continuous"]
    assert f"{statistics.median([2.0, 2.2, 1.8, 2.1]):.3f}" in rows["continuous"]  # warm-up step left out
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
