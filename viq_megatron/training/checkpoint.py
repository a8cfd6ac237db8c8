"""Training checkpoints with Megatron-Core dist_checkpointing, written atomically.

    output_dir/checkpoints/step_000050/   model + optimizer shards (dist_checkpointing),
                                          trainer.pt (step, scheduler), rng_rank{r}.pt
    output_dir/checkpoints/latest         the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp` and renamed only once every rank finished,
then `latest` is replaced atomically: a job killed mid-write leaves the previous
checkpoint as the latest. Loading never unpickles arbitrary objects: our files load with
weights_only, and before torch's checkpoint reader opens a checkpoint (it unpickles
`.metadata` with plain pickle, and non-tensor items with weights_only=False), every pickled
part of it is checked to hold nothing that could run code (`verify_checkpoint`).
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from viq_megatron.models.hf_llm import CheckpointError
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
    """A run's output_dir, its checkpoints/ folder or one step -> that step's directory, verified
    (`verify_checkpoint`)."""
    path = Path(path)
    step = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path) or path
    if not (step / "trainer.pt").is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    verify_checkpoint(step)
    return step


# What torch's distributed-checkpoint metadata is pickled from (besides torch dtypes); a
# `.metadata` that names anything else is refused before torch unpickles it.
_METADATA_CLASSES = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.source}: refused: it would load {module}.{name}, which checkpoint metadata "
                              "never holds (a crafted checkpoint?)")


def verify_checkpoint(step: Path) -> None:
    """Refuses (CheckpointError, one line naming the file) a checkpoint whose pickled parts could
    run code when torch reads them: `.metadata` may hold only the metadata classes above, and
    every non-tensor item in the shards must load with weights_only."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    source = step / ".metadata"
    try:
        with open(source, "rb") as f:
            metadata = _MetadataUnpickler(f, source).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged pickle raises
        raise CheckpointError(f"{source}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source}: not checkpoint metadata (holds a {type(metadata).__name__})")
    root = step.resolve()
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        shard = step / info.relative_path
        if shard.resolve().parent != root or getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{source}: item {index.fqn} is stored as {info.relative_path!r} with "
                                  f"{getattr(info, 'transform_descriptors', None)}; only plain shards in the "
                                  "checkpoint's own folder are read")
        try:
            with open(shard, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        except Exception as e:  # noqa: BLE001 - refused globals, truncation, a missing shard
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{shard}: refused item {index.fqn}: it does not load as plain data "
                                  f"({reason})") from None


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
    verify_checkpoint(path)
    loaded = dist_checkpointing.load(sharded_state, str(path))
    trainer_state = torch.load(path / "trainer.pt", weights_only=True)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return loaded, trainer_state
