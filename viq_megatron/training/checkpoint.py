"""Training checkpoints with Megatron-Core dist_checkpointing, written atomically.

    output_dir/checkpoints/step_000050/   model + optimizer shards (dist_checkpointing),
                                          trainer.pt (step, scheduler), rng_rank{r}.pt,
                                          complete (written last, fsync'd)
    output_dir/checkpoints/latest         the name of the newest checkpoint (for people and tools)

A checkpoint is written into `step_N.tmp`, marked complete once every rank finished, checked
whole and only then renamed into place. The newest whole checkpoint is found from the step
folders themselves: a missing or stale `latest` hides nothing, and a damaged newest folder
(missing or truncated shard, missing or garbage metadata, missing trainer.pt) is skipped with
a one-line warning for the one before it.

Loading never unpickles arbitrary objects: our files load with weights_only, and before
torch's checkpoint reader opens a checkpoint (it unpickles `.metadata` with plain pickle, and
non-tensor items with weights_only=False), every pickled part of it is checked to hold
nothing that could run code (`verify_checkpoint`).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from viq_megatron.config import Config
from viq_megatron.models.hf_llm import CheckpointError
from viq_megatron.models.lora import is_adapter
from viq_megatron.runtime.distributed import is_main_process
from viq_megatron.runtime.errors import first_line

log = logging.getLogger(__name__)
COMPLETE = "complete"
_STEP_FOLDER = re.compile(r"step_(\d+)(\.old)?")  # .old: a step's previous folder while it is replaced


def left_out(cfg: Config, key: str) -> bool:
    """Whether a run's checkpoints leave tensor `key` out: a frozen pretrained LLM is read from its
    own checkpoint at start-up and never changes (its LoRA adapters are saved). Everything else is
    saved, so that each stage's checkpoint is complete for the next one."""
    llm = cfg.model.llm
    return (
        llm is not None
        and bool(llm.checkpoint)
        and "llm" in cfg.train.freeze
        and key.startswith("llm.")
        and not is_adapter(key)
    )


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _step_folders(root: Path) -> list[Path]:
    """root's step folders, newest first (a step's .old folder after the step's own)."""
    found = [
        (int(m.group(1)), m.group(2) is None, p)
        for p in root.glob("step_*")
        if p.is_dir() and (m := _STEP_FOLDER.fullmatch(p.name))
    ]
    return [p for *_, p in sorted(found, key=lambda f: f[:2], reverse=True)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest whole checkpoint in `root` (a checkpoints/ folder), or None."""
    root = Path(root)
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    for step in _step_folders(root):
        # A folder `latest` names was saved whole even from before completion markers existed.
        problem = checkpoint_problem(step, marked=(step / COMPLETE).is_file() or step.name == named)
        if problem is None:
            return step
        if is_main_process():
            log.warning("%s: skipped, not a whole checkpoint: %s", step, problem)
    return None


def checkpoint_problem(step: Path, marked: bool | None = None) -> str | None:
    """Why `step` is not a whole checkpoint (None when it is): its completion mark (`marked`,
    else the marker file), trainer.pt, its verified metadata, and every shard the metadata
    names, as long as the metadata says."""
    if not (marked if marked is not None else (step / COMPLETE).is_file()):
        return "no completion mark (interrupted while saving?)"
    if not (step / "trainer.pt").is_file():
        return "trainer.pt is missing"
    try:
        metadata = _read_metadata(step)
    except CheckpointError as e:
        return str(e)
    sizes = {}
    for info in metadata.storage_data.values():
        if info.relative_path not in sizes:
            shard = step / info.relative_path
            if not shard.is_file():
                return f"shard {info.relative_path} is missing"
            sizes[info.relative_path] = shard.stat().st_size
        if sizes[info.relative_path] < info.offset + info.length:
            return f"shard {info.relative_path} is truncated"
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, sharded_state: dict, trainer_state: dict, keep_last: int = 0) -> Path:
    """Writes step `step` atomically (see the module docstring); with `keep_last` > 0, then
    removes whole checkpoints older than the newest `keep_last`. An existing folder of the same
    step is replaced only by a whole new one."""
    root = Path(root)
    final = root / f"step_{step:06d}"
    staging = root / f"step_{step:06d}.tmp"
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    try:
        dist_checkpointing.save(sharded_state, str(staging))
        torch.save(_rng_state(), staging / f"rng_rank{dist.get_rank()}.pt")
        if is_main_process():
            torch.save(trainer_state, staging / "trainer.pt")
    except (CheckpointException, RuntimeError, OSError) as e:
        # torch's writers lose the OSError (a worker's, or a zip writer's RuntimeError): say what can be known.
        reason = "" if isinstance(e, CheckpointException) else f"; {first_line(e)}"
        raise OSError(
            getattr(e, "errno", None) or errno.EIO,
            f"the checkpoint could not be written ({shutil.disk_usage(root).free / 2**20:.0f} MiB free there{reason})",
            str(staging),
        ) from None
    dist.barrier()
    if is_main_process():
        for path in staging.iterdir():
            _fsync(path)
        (staging / COMPLETE).write_text(f"{step}\n")
        _fsync(staging / COMPLETE)
        if (problem := checkpoint_problem(staging)) is not None:
            raise CheckpointError(f"{staging}: the checkpoint just written is not whole: {problem}")
        aside = root / f"{final.name}.old"
        if final.exists():  # the same step again: the old folder stays until the new one is in place
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(staging, final)
        _fsync(root)
        shutil.rmtree(aside, ignore_errors=True)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        if keep_last > 0:
            _remove_old_checkpoints(root, keep_last)
    dist.barrier()
    return final


def _remove_old_checkpoints(root: Path, keep: int) -> None:
    """Removes whole checkpoints older than the newest `keep` whole ones (damaged folders stay)."""
    whole = [p for p in _step_folders(root) if not p.name.endswith(".old") and checkpoint_problem(p) is None]
    for path in whole[keep:]:
        shutil.rmtree(path)


def checkpoint_step(path: str | Path) -> Path:
    """A run's output_dir, its checkpoints/ folder or one step -> that step's directory, verified
    (`verify_checkpoint`)."""
    path = Path(path)
    step = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path) or path
    if not (step / "trainer.pt").is_file() and not (step / ".metadata").is_file():
        if steps := _step_folders(path / "checkpoints") or _step_folders(path):
            raise CheckpointError(
                f"{path}: no whole checkpoint there; the newest, {steps[0].name}: {checkpoint_problem(steps[0])}"
            )
        raise CheckpointError(f"{path}: no checkpoint there")
    # A step folder named directly (latest_checkpoint has checked the ones it found).
    if step == path and (problem := checkpoint_problem(step, marked=True)) is not None:
        raise CheckpointError(f"{step}: not a whole checkpoint: {problem}")
    verify_checkpoint(step)
    return step


# What torch's distributed-checkpoint metadata is pickled from (besides torch dtypes); a
# `.metadata` that names anything else is refused before torch unpickles it.
_METADATA_CLASSES = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    *(
        ("torch.distributed.checkpoint.planner", name)
        for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.source}: refused: it would load {module}.{name}, which checkpoint metadata "
            "never holds (a crafted checkpoint?)"
        )


def _read_metadata(step: Path):
    """The checkpoint's torch metadata, read through the allowlist unpickler."""
    source = step / ".metadata"
    try:
        with open(source, "rb") as f:
            metadata = _MetadataUnpickler(f, source).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a missing file or a damaged pickle raises
        raise CheckpointError(f"{source}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source}: not checkpoint metadata (holds a {type(metadata).__name__})")
    return metadata


def verify_checkpoint(step: Path) -> None:
    """Refuses (CheckpointError, one line naming the file) a checkpoint whose pickled parts could
    run code when torch reads them: `.metadata` may hold only the metadata classes above, and
    every non-tensor item in the shards must load with weights_only."""
    source = step / ".metadata"
    metadata = _read_metadata(step)
    root = step.resolve()
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        shard = step / info.relative_path
        if shard.resolve().parent != root or getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{source}: item {index.fqn} is stored as {info.relative_path!r} with "
                f"{getattr(info, 'transform_descriptors', None)}; only plain shards in the "
                "checkpoint's own folder are read"
            )
        try:
            with open(shard, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        except Exception as e:  # noqa: BLE001 - refused globals, truncation, a missing shard
            raise CheckpointError(
                f"{shard}: refused item {index.fqn}: it does not load as plain data ({first_line(e)})"
            ) from None


def load_shared_weights(
    modules: list[torch.nn.Module], path: str | Path, prefix: str = "", exclude: tuple[str, ...] = ()
) -> tuple[int, int]:
    """Loads the tensors of `modules` (this rank's pipeline chunks; keys under `prefix`) that a
    checkpoint holds: a run's output_dir, its checkpoints/ folder, or one step; keys starting with
    one of `exclude` keep their initialisation. Collective: every rank calls it, also one with
    nothing to load. Returns this rank's (loaded, wanted)."""
    path = checkpoint_step(path)
    available = dist_checkpointing.load_tensors_metadata(str(path))
    wanted = {
        (i, k): v
        for i, module in enumerate(modules)
        for k, v in module.sharded_state_dict(prefix=prefix).items()
        if isinstance(v, (ShardedTensor, ShardedTensorFactory))
    }  # factories: e.g. SwiGLU's [gate; up]
    shared = {f"{i}/{k}": v for (i, k), v in wanted.items() if v.key in available and not k.startswith(exclude)}
    _check_shapes(path, shared)
    loaded = dist_checkpointing.load(shared, str(path))
    for i, module in enumerate(modules):
        mine = f"{i}/{prefix}"
        module.load_state_dict({k[len(mine) :]: v for k, v in loaded.items() if k.startswith(mine)}, strict=False)
    return len(shared), len(wanted)


def _check_shapes(path: Path, sharded_state: dict) -> None:
    """One line naming the first tensor whose saved shape differs from the model's."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for tensor in nested_values(sharded_state):
        if isinstance(tensor, ShardedTensor) and tensor.key in saved:
            there, here = tuple(saved[tensor.key].global_shape), tuple(tensor.global_shape)
            if there != here:
                raise CheckpointError(
                    f"{path}: tensor {tensor.key} is {list(there)} there but {list(here)} in this "
                    "model (its config changed?)"
                )


def load_checkpoint(path: str | Path, sharded_state: dict) -> tuple[dict, dict]:
    """(loaded sharded state, trainer state); also restores this rank's RNG streams."""
    path = Path(path)
    verify_checkpoint(path)
    _check_shapes(path, sharded_state)
    loaded = dist_checkpointing.load(sharded_state, str(path))
    trainer_state = torch.load(path / "trainer.pt", weights_only=True)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return loaded, trainer_state
