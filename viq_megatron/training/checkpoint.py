"""Training checkpoints with Megatron-Core dist_checkpointing, written atomically.

    output_dir/checkpoints/step_000050/   model + optimizer shards (dist_checkpointing),
                                          trainer.pt (step, scheduler), rng_rank{r}.pt
    output_dir/checkpoints/latest         the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp` and renamed only once every rank finished,
then `latest` is replaced atomically: a job killed mid-write leaves the previous
checkpoint as the latest. Loading never unpickles arbitrary objects (weights_only).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from viq_megatron.runtime.distributed import is_main_process


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(root: str | Path) -> Path | None:
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_checkpoint(root: str | Path, step: int, sharded_state: dict, trainer_state: dict) -> Path:
    root = Path(root)
    final = root / f"step_{step:06d}"
    staging = root / f"step_{step:06d}.tmp"
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(sharded_state, str(staging))
    torch.save(_rng_state(), staging / f"rng_rank{dist.get_rank()}.pt")
    if is_main_process():
        torch.save(trainer_state, staging / "trainer.pt")
    dist.barrier()
    if is_main_process():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
    dist.barrier()
    return final


def checkpoint_step(path: str | Path) -> Path:
    """A run's output_dir, its checkpoints/ folder or one step -> that step's directory."""
    path = Path(path)
    step = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path) or path
    if not (step / "trainer.pt").is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    return step


def load_shared_weights(modules: list[torch.nn.Module], path: str | Path, prefix: str = "",
                        exclude: tuple[str, ...] = ()) -> tuple[int, int]:
    """Loads the tensors of `modules` (this rank's pipeline chunks; keys under `prefix`) that a
    checkpoint holds: a run's output_dir, its checkpoints/ folder, or one step; keys starting with
    one of `exclude` keep their initialisation. Collective: every rank calls it, also one with
    nothing to load. Returns this rank's (loaded, wanted)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    path = checkpoint_step(path)
    available = dist_checkpointing.load_tensors_metadata(str(path))
    wanted = {(i, k): v for i, module in enumerate(modules)
              for k, v in module.sharded_state_dict(prefix=prefix).items()
              if isinstance(v, (ShardedTensor, ShardedTensorFactory))}  # factories: e.g. SwiGLU's [gate; up]
    shared = {f"{i}/{k}": v for (i, k), v in wanted.items() if v.key in available and not k.startswith(exclude)}
    loaded = dist_checkpointing.load(shared, str(path))
    for i, module in enumerate(modules):
        mine = f"{i}/{prefix}"
        module.load_state_dict({k[len(mine):]: v for k, v in loaded.items() if k.startswith(mine)}, strict=False)
    return len(shared), len(wanted)


def load_checkpoint(path: str | Path, sharded_state: dict) -> tuple[dict, dict]:
    """(loaded sharded state, trainer state); also restores this rank's RNG streams."""
    path = Path(path)
    loaded = dist_checkpointing.load(sharded_state, str(path))
    trainer_state = torch.load(path / "trainer.pt", weights_only=True)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return loaded, trainer_state
