import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import viq_megatron  # noqa: F401  (probes GPU extras before megatron.core loads)
from viq_megatron.config import load_config

ROOT = Path(__file__).resolve().parents[1]


TINY = [
    "model.encoder.hidden_size=64",
    "model.encoder.num_layers=2",
    "model.encoder.num_attention_heads=4",
    "model.encoder.ffn_hidden_size=128",
    "model.encoder.position_embedding_size=8",
    "model.params_dtype=float32",
    "data.image.min_pixels=256",
    "data.image.max_pixels=65536",
    "data.tokens_per_pack=1024",
]


def tiny_config(*overrides: str):
    """A small encoder for fast CPU tests."""
    return load_config(None, [*TINY, *overrides])


@pytest.fixture(scope="session")
def _megatron_groups():
    """A single-process gloo world with Megatron-Core groups (TP=1), made once per session."""
    from viq_megatron.runtime import cpu_compat
    from viq_megatron.runtime.distributed import initialize, shutdown

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    initialize(tiny_config().parallel, seed=1234, environ=env)
    cpu_compat.deactivate()  # on only inside the modules that ask for megatron_world
    yield
    shutdown()


@pytest.fixture(scope="module")
def megatron_world(_megatron_groups):
    """The session's Megatron-Core world, with the CPU compatibility layer on for this test
    module only: other modules see plain torch."""
    from viq_megatron.runtime import cpu_compat

    with cpu_compat.patched():
        yield


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `torchrun --nproc-per-node nproc ARGS` on CPU (gloo); fails the test with its output on error."""
    from viq_megatron.runtime.distributed import launch_env

    port = launch_env({}).master_port  # a free local port
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if result.returncode != 0:
        pytest.fail(f"torchrun {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def make_image(path: Path, size=(64, 48), mode="RGB", seed=0, **save_kwargs) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, **save_kwargs)
    return path


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


TINY_TRAIN = [
    *TINY,
    "model.llm.arch={hidden_size: 64, num_layers: 2, num_attention_heads: 4, num_query_groups: 2, "
    "ffn_hidden_size: 128, vocab_size: 512, rotary_base: 10000.0}",
    "model.llm.tokenizer.kind=sentencepiece",
    "model.llm.tokenizer.sentencepiece_vocab_size=400",
    "data.embedded.train_scenes=24",
    "data.embedded.val_scenes=6",
    "data.image.min_pixels=1024",
    "data.image.max_pixels=4096",
    "data.seq_length=256",
    "data.teacher_image_size=32",
    "data.num_workers=0",
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=0",
    "train.optimizer.warmup_steps=1",
    "train.optimizer.lr=0.001",
]


def tiny_train_config(output_dir, *overrides: str):
    """Stage 1 with a tiny random LLM (SentencePiece tokenizer) and a tiny encoder."""
    return load_config(None, [*TINY_TRAIN, f"train.output_dir={output_dir}", *overrides])
