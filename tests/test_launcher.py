"""slurm/pretrain_viq.sh: a stage end to end outside Slurm, SIGTERM mid-run and resume, faked Slurm."""

import json
import os
import signal
import subprocess
import time

from conftest import ROOT

from viq_megatron.runtime.distributed import launch_env

SMOKE = [
    "examples/stage1_smoke.yaml",
    "train.steps=60",
    "train.save_every=0",
    "train.eval_every=0",
    "train.log_every=1",
    "data.embedded.train_scenes=16",
]


def launcher_env(**extra):
    return {**os.environ, "NPROC": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(launch_env({}).master_port), **extra}


def train_losses(folder):
    lines = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l["loss"] for l in lines if l["split"] == "train"}


def test_sigterm_saves_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    script = str(ROOT / "slurm/pretrain_viq.sh")
    straight = subprocess.run(
        ["bash", script, *SMOKE, f"train.output_dir={tmp_path / 'straight'}"],
        capture_output=True,
        text=True,
        env=launcher_env(),
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert (tmp_path / "straight/finished").read_text().strip() == "60"

    out = tmp_path / "interrupted"
    job = subprocess.Popen(
        ["bash", script, *SMOKE, f"train.output_dir={out}"],
        env=launcher_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(train_losses(out)) >= 3):
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGTERM)  # as Slurm does on preemption
    job.wait(timeout=120)
    latest = (out / "checkpoints/latest").read_text().strip()
    stopped_at = int(latest.removeprefix("step_"))
    assert 3 <= stopped_at < 60 and not (out / "finished").exists()

    resumed = subprocess.run(
        ["bash", script, *SMOKE, f"train.output_dir={out}"],
        capture_output=True,
        text=True,
        env=launcher_env(),
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(out) == train_losses(tmp_path / "straight")


def test_faked_slurm_allocation(tmp_path):
    """Under Slurm the script takes the master from the allocation, runs one srun, and
    requeues a job that stopped before its last step."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/sh\n[ "$1" = show ] && printf "gpu003\\ngpu004\\n" || echo "scontrol $*"\n'
    )
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun MASTER=$MASTER_ADDR:$MASTER_PORT $*"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="viq",
        SLURM_JOB_NODELIST="gpu[003-004]",
        SLURM_SUBMIT_DIR=str(ROOT),
    )
    result = subprocess.run(
        ["bash", str(ROOT / "slurm/pretrain_viq.sh"), "examples/stage1_smoke.yaml", "seed=3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "srun MASTER=gpu003:24242 " in result.stdout
    assert (
        "-m viq_megatron.train --config examples/stage1_smoke.yaml train.output_dir=runs/viq-4242 seed=3"
        in result.stdout
    )
    assert "scontrol requeue 4242" in result.stdout  # the stub trained nothing: not finished
    assert (
        launch_env(
            {
                "SLURM_PROCID": "1",
                "SLURM_NTASKS": "16",
                "SLURM_LOCALID": "1",
                "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NODELIST": "gpu[003-004]",
            }
        ).master_port
        == 24242
    )  # the Python side agrees
    evaluate = subprocess.run(
        ["bash", str(ROOT / "slurm/pretrain_viq.sh"), "evaluate", "--config", "c.yaml", "--questions", "q.jsonl"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert evaluate.returncode == 0, evaluate.stderr
    assert "-m viq_megatron.evaluate --config c.yaml --questions q.jsonl" in evaluate.stdout
    assert "requeue" not in evaluate.stdout  # not a training job: nothing to resume
