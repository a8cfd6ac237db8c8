"""Run under torchrun with 2 processes: TP=2 encoder vs the TP=1 encoder on the same weights.

Writes the measured differences as JSON to argv[1]; the test asserts on them.
"""

import json
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel

import viq_megatron  # noqa: F401
from viq_megatron.config import load_config
from viq_megatron.data.images import load_native_image
from viq_megatron.data.packing import PackedImages
from viq_megatron.models.provider import build_encoder
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
    grad_diff = {
        n: ((gather_full(p, p.grad) - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item()
        for n, p in split.named_parameters()
    }
    split_params = [n for n, p in split.named_parameters() if getattr(p, "tensor_model_parallel", False)]

    # RNG tracker on CPU: a fork gives each TP rank its own stream; outside it ranks agree.
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(8)
    shared = torch.rand(8)
    gathered_forked = [torch.empty(8) for _ in range(2)]
    gathered_shared = [torch.empty(8) for _ in range(2)]
    torch.distributed.all_gather(gathered_forked, forked)
    torch.distributed.all_gather(gathered_shared, shared)

    head_result = head_parity(image_dir)
    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(
            json.dumps(
                {
                    **head_result,
                    "output_max_diff": (out - ref_out).abs().max().item(),
                    "output_scale": ref_out.abs().max().item(),
                    "grad_relative_diff": grad_diff,
                    "split_params": split_params,
                    "forked_streams_differ": not torch.equal(*gathered_forked),
                    "shared_stream_agrees": torch.equal(*gathered_shared),
                }
            )
        )


def head_parity(image_dir: str) -> dict:
    """Encoder + ViQ head at TP=2 vs TP=1 on the same weights: features, bottleneck, codes."""
    from viq_megatron.models.provider import quantized_input

    head = "model.head={subtoken_size: 32, pre_layers: 1, subtoken_layers: 1, subtoken_ffn_size: 64, post_blocks: 1}"
    cfg1 = load_config(None, [*TINY, head])
    cfg2 = load_config(None, [*TINY, head, "parallel.tensor_model_parallel_size=2"])
    images = [load_native_image(path, cfg1.data.image, 16) for path in sorted(Path(image_dir).glob("*.png"))]
    packed = PackedImages.from_images(images)

    def run(visual):
        with torch.no_grad():
            tokens = visual.encoder(packed)
            z = visual.head.pre_quantization(tokens, packed)
            return z, visual.head.post_quantization(visual.head.quantizer(z))

    initialize(cfg1.parallel, seed=cfg1.seed)
    dense = quantized_input(cfg1, 64).eval()
    weights = {k: v.clone() for k, v in dense.state_dict().items() if torch.is_tensor(v)}
    z1, features1 = run(dense)
    fsq = dense.head.quantizer.fsq
    parallel_state.destroy_model_parallel()
    initialize(cfg2.parallel, seed=cfg2.seed)
    split = quantized_input(cfg2, 64).eval()
    load_full_state_dict(split, weights)
    z2, features2 = run(split)
    tau = (z2 - z1).abs().max()
    digits = fsq.level_digits(fsq.codes_to_indices(fsq(z2)))
    low = fsq.level_digits(fsq.codes_to_indices(fsq(z1 - tau)))
    high = fsq.level_digits(fsq.codes_to_indices(fsq(z1 + tau)))
    parallel_state.destroy_model_parallel()
    return {
        "head_z_max_diff": tau.item(),
        "head_feature_max_diff": (features2 - features1).abs().max().item(),
        "head_codes_consistent": bool(((digits >= low) & (digits <= high)).all()),
        "head_codes_equal_fraction": (fsq.codes_to_indices(fsq(z2)) == fsq.codes_to_indices(fsq(z1)))
        .float()
        .mean()
        .item(),
    }


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    shutdown()
