"""Runtime: launcher environments, the CPU compatibility layer, GPU-extra detection."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT

from viq_megatron.runtime import cpu_compat
from viq_megatron.runtime.distributed import first_slurm_host, launch_env


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("node7", "node7"),
        ("gpu[003-010,12]", "gpu003"),
        ("gpu[12,3-5],cpu1", "gpu12"),
        ("rack-a-[1-4]", "rack-a-1"),
        ("a01,a02", "a01"),
    ],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_launch_env_torchrun():
    env = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3,
        8,
        1,
        "n1",
        1234,
        "torchrun",
    )


def test_launch_env_slurm():
    env = launch_env(
        {
            "SLURM_PROCID": "13",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "5",
            "SLURM_JOB_NODELIST": "dgx[07-08]",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (13, 16, 5, "dgx07", "slurm")
    assert env.master_port == 20000 + 4242
    explicit = launch_env(
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "x", "MASTER_PORT": "999", "MASTER_ADDR": "head"}
    )
    assert (explicit.master_addr, explicit.master_port) == ("head", 999)


def test_launch_env_single_process():
    env = launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is off on CUDA machines")


@cpu_only
def test_compat_layer_active_on_cpu(megatron_world):
    """The session world was initialised on this CUDA-less machine: the layer must be on."""
    assert not torch.cuda.is_available()
    assert cpu_compat.is_active()
    assert torch.cuda.current_device() == torch.device("cpu")
    x = torch.ones(2)
    assert x.cuda() is x
    torch.cuda.synchronize()


@cpu_only
def test_compat_layer_covers_megatron_calls(megatron_world):
    from megatron.core import tensor_parallel
    from megatron.core.parallel_state import get_global_memory_buffer
    from megatron.core.tensor_parallel.random import get_data_parallel_rng_tracker_name

    tensor_parallel.model_parallel_cuda_manual_seed(99)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(5)
    expected_default = torch.rand(4)
    torch.manual_seed(5)
    with tracker.fork():
        forked = torch.rand(4)
    assert torch.equal(torch.rand(4), expected_default)  # the fork leaves the default stream alone
    with tracker.fork():
        assert not torch.equal(torch.rand(4), forked)  # the forked stream advanced, not restarted
    tensor_parallel.model_parallel_cuda_manual_seed(99)
    with tracker.fork():
        assert torch.equal(torch.rand(4), forked)  # reseeding reproduces it
    with tracker.fork(get_data_parallel_rng_tracker_name()):
        torch.rand(1)
    buffer = get_global_memory_buffer().get_tensor((3, 2), torch.float32, "test")
    assert buffer.device.type == "cpu"


@cpu_only
def test_compat_layer_leaves_cuda_machines_untouched(megatron_world, monkeypatch):
    originals = {name: getattr(torch.cuda, name) for name in ("current_device", "synchronize", "get_rng_state")}
    cpu_compat.deactivate()
    try:
        restored = {name: getattr(torch.cuda, name) for name in originals}
        assert all(restored[n] is not originals[n] for n in originals)  # they were patched before
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert cpu_compat.activate() is False
        assert not cpu_compat.is_active()
        for name, fn in restored.items():
            assert getattr(torch.cuda, name) is fn
        assert torch.Tensor.cuda is not cpu_compat._stay_on_cpu
    finally:
        monkeypatch.undo()
        assert cpu_compat.activate() is True


def test_broken_gpu_extras_are_hidden_from_megatron(tmp_path):
    """A partial Transformer Engine and PyPI's unrelated `apex` must not reach megatron-core."""
    (tmp_path / "transformer_engine").mkdir()
    (tmp_path / "transformer_engine/__init__.py").write_text("")
    (tmp_path / "transformer_engine/pytorch.py").write_text("raise OSError('libcudart.so: cannot open')\n")
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex/__init__.py").write_text("WEB_TOOLKIT = True\n")
    script = textwrap.dedent("""
        import viq_megatron
        from megatron.core.extensions import transformer_engine as te_ext
        from megatron.core.models.vision import vit_layer_specs
        print(viq_megatron.GPU_EXTRAS, te_ext.HAVE_TE, vit_layer_specs.HAVE_APEX)
    """)
    path = os.pathsep.join(p for p in (str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "{'transformer_engine': False, 'apex': False} False False"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_machine_leaves_torch_cuda_alone(megatron_world):
    assert not cpu_compat.is_active()
    assert isinstance(torch.cuda.current_device(), int)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without Transformer Engine")
def test_fp8_without_transformer_engine_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "viq_megatron.train",
            "--config",
            "examples/stage1_smoke.yaml",
            "model.fp8=delayed",
            f"train.output_dir={tmp_path}",
            "data.embedded.train_scenes=4",
            "data.embedded.val_scenes=2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.fp8: FP8 needs Transformer Engine layers") and "not installed" in last


def test_importing_changes_no_warning_filter_and_the_gpu_extras_are_probed_once():
    """`import viq_megatron` (and its megatron-core modules) probes the GPU extras, once, and
    leaves Python's warning filters alone: programs quiet megatron-core's warnings themselves,
    and doing it twice adds nothing."""
    script = textwrap.dedent("""
        import json, warnings
        import torch
        ours = ("Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated",
                "When using async grad allreduce it is recommended")
        def quieted():
            return [f[1].pattern for f in warnings.filters if f[0] == "ignore" and f[1] is not None
                    and f[1].pattern in ours]
        import viq_megatron
        from viq_megatron import ViQTokenizer
        import viq_megatron.models.provider
        from viq_megatron.runtime import extras
        after_import = quieted()
        same = extras.prepare_gpu_extras() is viq_megatron.GPU_EXTRAS
        extras.quiet_megatron_warnings()
        once = quieted()
        extras.quiet_megatron_warnings()
        print(json.dumps({"after_import": after_import, "same": same, "once": once, "twice": quieted()}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["after_import"] == [] and report["same"]
    assert "full scope is deprecated" in report["once"] and report["twice"] == report["once"]
    assert len(set(report["once"])) == len(report["once"])


def test_the_loader_registers_its_exit_handler_with_its_first_workers(monkeypatch):
    """Importing data/loader.py registers nothing; the first loader with workers makes the exit
    flag and registers it once; its workers ignore Slurm's signals until the flag is set."""
    script = textwrap.dedent("""
        import atexit, multiprocessing.util, torch.utils.data
        import viq_megatron.data.multimodal
        before = atexit._ncallbacks()
        from viq_megatron.data import loader
        print(atexit._ncallbacks() - before, loader._main_exiting is None)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", "True"]

    import atexit

    from viq_megatron.data import loader

    registered = []
    monkeypatch.setattr(loader, "_main_exiting", None)
    monkeypatch.setattr(atexit, "register", registered.append)
    rows = [torch.tensor([i]) for i in range(8)]
    rows_of_step = lambda step: [step % 8]  # noqa: E731
    assert next(loader.row_loader(rows, rows_of_step, 3, workers=0, prefetch=2)).item() == 3
    assert registered == [] and loader._main_exiting is None  # no workers: nothing to signal
    first = loader.row_loader(rows, rows_of_step, 3, workers=1, prefetch=2)
    flag = loader._main_exiting
    assert registered == [flag.set] and not flag.is_set()
    second = loader.row_loader(rows, rows_of_step, 5, workers=1, prefetch=2)
    assert [next(first).item(), next(second).item()] == [3, 5]
    assert registered == [flag.set] and loader._main_exiting is flag  # once per process
    del second
    worker = first._workers[0]
    os.kill(worker.pid, signal.SIGTERM)  # Slurm's, while the training process runs: ignored
    os.kill(worker.pid, signal.SIGUSR1)
    worker.join(timeout=1)
    assert worker.is_alive() and next(first).item() == 4
    flag.set()  # as at the training process's exit: now a SIGTERM ends the worker
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=30)
    assert worker.exitcode == 0
    del first
