"""Process start-up: torch.distributed from torchrun or Slurm, Megatron-Core parallel groups, seeds.

env = initialize(cfg.parallel, seed=cfg.seed)   # NCCL with CUDA, gloo without
...
shutdown()
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from viq_megatron.config import ConfigError, ParallelConfig
from viq_megatron.runtime import cpu_compat


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as its launcher (torchrun, srun, or none) describes it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[003-010,12],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = head.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Reads torchrun's variables, else srun's (one task per GPU), else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]
        # Derive the port from the job id so concurrent jobs sharing a node do not collide.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 40000))
        return LaunchEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR", first_slurm_host(nodelist)),
            port,
            "slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(parallel: ParallelConfig, seed: int, environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """torch.distributed + Megatron-Core model-parallel groups + seeds, for this process."""
    env = launch_env(environ)
    model_parallel = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    if env.world_size % model_parallel:
        raise ConfigError(
            f"parallel: {env.world_size} processes cannot be split into tensor x pipeline = "
            f"{parallel.tensor_model_parallel_size} x {parallel.pipeline_model_parallel_size} groups"
        )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        cpu_compat.activate()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            # torchrun's agent already serves a store at MASTER_PORT: join it rather than bind the port.
            init_method="env://" if env.launcher == "torchrun" else f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=10),
        )
    if parallel_state.model_parallel_is_initialized():  # a new job in the same process (tests)
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size
        if parallel.virtual_pipeline_model_parallel_size > 1
        else None,
    )
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Same default stream on every rank; a distinct stream per tensor-parallel rank.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return env


def setup_logging(rank: int) -> None:
    """Console logging: everything from the first process, only errors from the others."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines dump whole configs
    # GPTModel is deprecated upstream in favour of HybridModel; it is the Llama/Qwen2 model we match.
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)


def shutdown() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu_compat.deactivate()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
