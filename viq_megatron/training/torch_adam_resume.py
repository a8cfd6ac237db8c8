"""Resuming Megatron-Core's distributed optimizer when it wraps torch's Adam.

On clusters the distributed optimizer runs apex's or TE's fused Adam. Without them (CPU,
GPUs without TE) it wraps torch's Adam, and megatron-core 0.19's resume path trips over
the per-parameter `step` tensor torch's Adam keeps:
- laying out the checkpoint to load needs every parameter's state, `step` included, but
  torch's Adam creates its state only at the first step;
- the loader copies every tensor of a parameter's state from the checkpoint, which never
  holds `step` (it is restored from the parameter groups).
`prepare_resume` mends both on the optimizers that wrap torch's Adam, and only on them: a
fused Adam's optimizer, and the class itself, are left as they are.
"""

from __future__ import annotations

from types import MethodType

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


def _set_states_keeping_step(self, model_param, tensors):
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    step = self.optimizer.state[main_param].get("step")
    if torch.is_tensor(step) and "step" not in tensors:
        tensors = {**tensors, "step": step}  # copied onto itself
    return DistributedOptimizer._set_main_param_and_optimizer_states(self, model_param, tensors)


def prepare_resume(optimizer) -> None:
    """Before a checkpoint loads into `optimizer`: zero Adam state where torch's Adam has none
    yet (as a first step would create it; the load overwrites it), and a loader that keeps `step`."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(chained, DistributedOptimizer) or not isinstance(chained.optimizer, torch.optim.Adam):
            continue
        for group in chained.optimizer.param_groups:
            for param in group["params"]:
                state = chained.optimizer.state[param]
                if not state:
                    state.update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param)
                    )
        chained._set_main_param_and_optimizer_states = MethodType(_set_states_keeping_step, chained)
