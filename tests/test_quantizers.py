import pytest
import torch

from viq_megatron.models.quantizers import FSQ, FSQ_PRESETS, Quantizer, linf_project, round_ste


@pytest.mark.parametrize("preset", sorted(FSQ_PRESETS))
def test_fsq_index_code_round_trip_for_every_index(preset):
    fsq = FSQ(FSQ_PRESETS[preset])
    expected_size = {"2k": 2304, "4k": 4096, "8k": 8192, "16k": 15360, "64k": 64000}[preset]
    assert fsq.codebook_size == expected_size
    indices = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(indices)
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    assert len({tuple(c) for c in codes.tolist()}) == fsq.codebook_size  # all codes distinct


@pytest.mark.parametrize("preset", sorted(FSQ_PRESETS))
def test_fsq_outputs_are_codes_within_the_codebook(preset):
    fsq = FSQ(FSQ_PRESETS[preset])
    z = torch.randn(5000, fsq.dim, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        q = fsq(z)
    indices = fsq.codes_to_indices(q)
    assert indices.min() >= 0 and indices.max() < fsq.codebook_size
    assert torch.equal(fsq.indices_to_codes(indices), q)  # exactly the values dequantized from the index
    levels_used = [len(torch.unique(q[:, k])) for k in range(fsq.dim)]
    assert levels_used == FSQ_PRESETS[preset]  # every level of every dimension is reachable


def test_straight_through_gradient_equals_identity():
    x = torch.randn(64, 5, requires_grad=True)
    weight = torch.randn(64, 5)
    (round_ste(x) * weight).sum().backward()
    assert torch.equal(x.grad, weight)
    assert torch.equal(round_ste(x.detach()), torch.round(x.detach()))
    fsq = FSQ([8, 8, 8, 6, 5])
    z = torch.randn(64, 5, requires_grad=True)
    (fsq(z) * weight).sum().backward()
    bounded = z.detach().clone().requires_grad_(True)
    (fsq.bound(bounded) / fsq._half_width * weight).sum().backward()
    assert torch.allclose(z.grad, bounded.grad)  # rounding contributes the identity's gradient


def test_linf_projection_on_surface_and_idempotent():
    z = torch.randn(1000, 6) * torch.rand(1000, 1) * 10
    p = linf_project(z)
    assert torch.allclose(p.abs().amax(-1), torch.ones(1000))
    assert torch.allclose(linf_project(p), p)
    assert torch.allclose(p, z / z.abs().max(-1, keepdim=True).values)


def test_progressive_blend_endpoints():
    quantizer = Quantizer("progressive", FSQ_PRESETS["4k"])
    z = torch.randn(100, 5)
    quantizer.blend = 0.0
    assert torch.allclose(quantizer(z), linf_project(z))
    quantizer.blend = 1.0
    assert torch.equal(quantizer(z), quantizer.fsq(z))
    quantizer.blend = 0.25
    assert torch.allclose(quantizer(z), 0.75 * linf_project(z) + 0.25 * quantizer.fsq(z))


def test_the_progressive_blend_is_module_state_that_checkpoints_keep():
    """The schedule's weight travels in the state dict (so a checkpoint, and the model inference
    rebuilds from it, quantize as training last did); fixed quantizers carry no such state."""
    trained = Quantizer("progressive", FSQ_PRESETS["4k"])
    trained.blend = 0.3
    rebuilt = Quantizer("progressive", FSQ_PRESETS["4k"])
    assert rebuilt.blend.item() == 1.0
    rebuilt.load_state_dict(trained.state_dict())
    z = torch.randn(50, 5)
    assert rebuilt.blend.item() == 0.3 and torch.equal(rebuilt(z), trained(z))
    assert torch.equal(trained(z), (1 - 0.3) * linf_project(z) + 0.3 * trained.fsq(z))  # as with a Python float
    assert "fsq_weight" not in Quantizer("fsq", FSQ_PRESETS["4k"]).state_dict()
