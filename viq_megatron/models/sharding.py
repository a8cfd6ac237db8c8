"""Moving full (TP=1) weights to and from tensor-parallel shards.

Megatron-Core marks every split parameter with `tensor_model_parallel`,
`partition_dim` and `partition_stride`; everything else is replicated. Fused
layouts (e.g. `linear_qkv`, grouped per query group) are split in contiguous chunks,
which is what these helpers do, so they need no per-layer knowledge.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _is_split(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def split_tensor(tensor: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s part of a full tensor split over `size` ranks along `dim`. With stride s
    (e.g. 2 for SwiGLU's [gate; up]) the full tensor is s blocks, and each rank holds its chunk
    of every block."""
    return torch.cat([block.chunk(size, dim)[rank] for block in tensor.chunk(stride, dim)], dim)


def shard(tensor: torch.Tensor, param: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's part of a full tensor, as `param` (a parameter of the split model) is split."""
    if not _is_split(param) or size == 1:
        return tensor
    return split_tensor(tensor, param.partition_dim, getattr(param, "partition_stride", 1), rank, size)


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Loads TP=1 tensors into this rank's shards of `model` (missing or extra keys are an error).
    Outside a Megatron runtime (a standalone module) the model is whole."""
    split = parallel_state.model_parallel_is_initialized()
    rank = parallel_state.get_tensor_model_parallel_rank() if split else 0
    size = parallel_state.get_tensor_model_parallel_world_size() if split else 1
    params = dict(model.named_parameters())
    local = {name: shard(t, params[name], rank, size) if name in params else t for name, t in full.items()}
    for name, tensor in local.items():
        if name in params and params[name].shape != tensor.shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit the model's "
                f"{tuple(params[name].shape)} (tensor-parallel rank {rank} of {size})"
            )
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")


def gather_full(param: torch.Tensor, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The full (TP=1) value of `tensor` (default: `param` itself) for a parameter's layout."""
    tensor = param.detach() if tensor is None else tensor
    size = parallel_state.get_tensor_model_parallel_world_size()
    if not _is_split(param) or size == 1:
        return tensor
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    blocks = [part.chunk(stride, dim) for part in parts]
    return torch.cat([torch.cat([b[i] for b in blocks], dim) for i in range(stride)], dim)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in TP=1 layout (collective over the tensor-parallel group)."""
    params = dict(model.named_parameters())
    return {
        name: gather_full(params[name], t) if name in params else t
        for name, t in model.state_dict().items()
        if torch.is_tensor(t)
    }
