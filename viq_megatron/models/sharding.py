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


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Loads TP=1 tensors into this rank's shards of `model`."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    local = {}
    for name, tensor in full.items():
        param = params.get(name)
        if param is not None and _is_split(param):
            if getattr(param, "partition_stride", 1) != 1:
                raise NotImplementedError(f"{name}: strided tensor-parallel partitions are not supported")
            tensor = tensor.chunk(size, dim=param.partition_dim)[rank]
        local[name] = tensor
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
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=param.partition_dim)
