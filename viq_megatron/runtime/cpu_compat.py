"""Lets megatron-core run without CUDA: one table of patches, applied only when CUDA is absent.

megatron-core names CUDA in places that mean "the current device" rather than "a GPU":
a `device=torch.cuda.current_device()` argument, `torch.cuda.synchronize()` around
collectives, `.cuda()` on tensors that are already where they belong, and the RNG
tracker that forks the CUDA generator so tensor-parallel ranks draw different dropout
masks. On a CPU-only machine each patch gives the call its CPU meaning; the RNG
tracker then tracks the CPU generator, with the same seeds and the same fork
semantics. With CUDA present `activate()` does nothing, so a GPU run is untouched.

The layer is process-wide while on, so it is on only where Megatron's runtime runs:
`runtime.distributed.initialize` (every training and tool entry point) switches it on and
`shutdown` off; tests scope it with `patched()`. Library users (ViQTokenizer, the HF
adapter) never see it: their modules are built standalone.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.tensor_parallel import random as mp_random


@dataclass(frozen=True)
class Patch:
    owner: Any
    name: str
    replacement: Callable[..., Any]
    why: str


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def _stay_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


class _CpuStream:
    """Stands in for a CUDA stream: on the CPU all work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _current_stream(*args: Any, **kwargs: Any) -> _CpuStream:
    return _CpuStream()


def _stream_context(stream: Any) -> contextlib.nullcontext:
    return contextlib.nullcontext()


_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self: torch.Tensor, *args: Any, **kwargs: Any):
    """megatron-core asserts `t.type() == 'torch.cuda.FloatTensor'` (clip_grads, the mixed-
    precision and distributed optimizers): report a CPU tensor under its CUDA name. The
    conversion form `t.type(dtype)` is left alone."""
    if args or kwargs:
        return _TENSOR_TYPE(self, *args, **kwargs)
    name = _TENSOR_TYPE(self)
    return name.replace("torch.", "torch.cuda.", 1) if name.count(".") == 1 else name


_FACTORIES = (
    "tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand",
    "randn",
)


class _TorchOnCpu:
    """`torch` as seen by a megatron-core module that writes `device='cuda'` literally:
    tensor factories place such tensors on the CPU; everything else is plain torch."""

    def __init__(self) -> None:
        for name in _FACTORIES:
            setattr(self, name, self._on_cpu(getattr(torch, name)))

    @staticmethod
    def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def make(*args: Any, **kwargs: Any) -> torch.Tensor:
            device = kwargs.get("device")
            if device is not None and torch.device(device).type == "cuda":
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)

        return make

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


# megatron-core modules that create tensors with a literal device='cuda'.
_CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)


def _get_cpu_rng_state(*args: Any, clone: bool = False, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()  # already a copy


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


class _DropForkWarning(logging.Filter):
    """The tracker warns when the CPU generator moves inside a fork; on CPU that generator
    *is* the forked one, so the warning fires on every dropout and means nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("CPU RNG state changed within GPU RNG context")


def _patches() -> list[Patch]:
    torch_on_cpu = _TorchOnCpu()
    return [
        *(
            Patch(importlib.import_module(module), "torch", torch_on_cpu, "tensors created with device='cuda'")
            for module in _CUDA_LITERAL_MODULES
        ),
        Patch(torch.Tensor, "type", _cuda_type_name, "asserts on 'torch.cuda.*Tensor' type names"),
        Patch(torch.cuda, "current_device", _cpu_device, "used as a device argument when creating tensors and buffers"),
        Patch(torch.cuda, "synchronize", _no_op, "CPU work is already synchronous"),
        Patch(torch.cuda, "current_stream", _current_stream, "DDP orders gradient reduction on streams"),
        Patch(torch.cuda, "Stream", _CpuStream, "DDP's communication stream"),
        Patch(torch.cuda, "stream", _stream_context, "DDP's communication stream context"),
        Patch(torch.Tensor, "cuda", _stay_on_cpu, "optimizer/checkpoint code moves state 'to the GPU'"),
        Patch(torch.cuda, "get_rng_state", _get_cpu_rng_state, "RNG tracker: read the generator"),
        Patch(torch.cuda, "manual_seed", torch.manual_seed, "RNG tracker: seed the generator"),
        Patch(mp_random, "_get_cuda_rng_state", _get_cpu_rng_state, "RNG tracker fork: save the state"),
        Patch(mp_random, "_set_cuda_rng_state", _set_cpu_rng_state, "RNG tracker fork: restore the state"),
    ]


_originals: list[tuple[Any, str, Any]] = []
_fork_warning_filter = _DropForkWarning()


def is_active() -> bool:
    return bool(_originals)


def activate() -> bool:
    """Applies the patches when CUDA is absent; returns whether they are active."""
    if torch.cuda.is_available() or is_active():
        return is_active()
    for patch in _patches():
        _originals.append((patch.owner, patch.name, getattr(patch.owner, patch.name)))
        setattr(patch.owner, patch.name, patch.replacement)
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_fork_warning_filter)
    return True


@contextlib.contextmanager
def patched() -> Iterator[bool]:
    """The layer for the duration of a block; afterwards torch is as it was before it."""
    was_active = is_active()
    try:
        yield activate()
    finally:
        if not was_active:
            deactivate()


def deactivate() -> None:
    """Restores every patched attribute."""
    while _originals:
        owner, name, original = _originals.pop()
        setattr(owner, name, original)
    logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_fork_warning_filter)


def patched_names() -> list[str]:
    return [f"{getattr(p.owner, '__name__', p.owner)}.{p.name}" for p in _patches()]
