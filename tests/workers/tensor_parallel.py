"""Run under torchrun with 2 processes: TP=2 encoder vs the TP=1 encoder on the same weights.

Writes the measured differences as JSON to argv[1]; the test asserts on them.
"""
import json
import sys
from pathlib import Path

import torch

import viq_megatron  # noqa: F401
from megatron.core import parallel_state, tensor_parallel

from viq_megatron.config import load_config
from viq_megatron.data.images import load_native_image
from viq_megatron.data.packing import PackedImages
from viq_megatron.encode import build_encoder
from viq_megatron.models.sharding import gather_full, load_full_state_dict
from viq_megatron.runtime.distributed import initialize, shutdown

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY  # noqa: E402


def forward_backward(model, packed, projection):
    model.zero_grad(set_to_none=True)
    out = model(packed)
    (out * projection).sum().backward()
    return out.detach()


def main(out_path: str, image_dir: str) -> None:
    cfg1 = load_config(None, TINY)
    cfg2 = load_config(None, [*TINY, "parallel.tensor_model_parallel_size=2"])
    images = [load_native_image(path, cfg1.data.image, 16) for path in sorted(Path(image_dir).glob("*.png"))]
    packed = PackedImages.from_images(images)
    projection = torch.randn(packed.num_tokens, 64, generator=torch.Generator().manual_seed(0))

    initialize(cfg1.parallel, seed=cfg1.seed)
    dense, _ = build_encoder(cfg1)
    full_weights = {k: v.clone() for k, v in dense.state_dict().items() if torch.is_tensor(v)}
    ref_out = forward_backward(dense, packed, projection)
    ref_grads = {n: p.grad.clone() for n, p in dense.named_parameters()}
    parallel_state.destroy_model_parallel()

    initialize(cfg2.parallel, seed=cfg2.seed)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    split, _ = build_encoder(cfg2)
    load_full_state_dict(split, full_weights)
    out = forward_backward(split, packed, projection)
    grad_diff = {n: ((gather_full(p, p.grad) - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item()
                 for n, p in split.named_parameters()}
    split_params = [n for n, p in split.named_parameters() if getattr(p, "tensor_model_parallel", False)]

    # RNG tracker on CPU: a fork gives each TP rank its own stream; outside it ranks agree.
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(8)
    shared = torch.rand(8)
    gathered_forked = [torch.empty(8) for _ in range(2)]
    gathered_shared = [torch.empty(8) for _ in range(2)]
    torch.distributed.all_gather(gathered_forked, forked)
    torch.distributed.all_gather(gathered_shared, shared)

    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps({
            "output_max_diff": (out - ref_out).abs().max().item(),
            "output_scale": ref_out.abs().max().item(),
            "grad_relative_diff": grad_diff,
            "split_params": split_params,
            "forked_streams_differ": not torch.equal(*gathered_forked),
            "shared_stream_agrees": torch.equal(*gathered_shared),
        }))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
