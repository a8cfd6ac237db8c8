"""The ViQ head and ViQTokenizer: position awareness, offline == online, invariance, files."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, make_image, tiny_train_config

from viq_megatron.data.images import load_native_image
from viq_megatron.data.packing import PackedImages

HEAD = "model.head={subtoken_size: 32, pre_layers: 1, subtoken_layers: 2, subtoken_ffn_size: 64, post_blocks: 1}"
DECODER = "model.decoder={hidden_size: 32, num_layers: 1, num_attention_heads: 2, ffn_hidden_size: 64}"


def tokenizer(tmp_path, *overrides):
    from viq_megatron.tokenizer import ViQTokenizer

    torch.manual_seed(0)
    return ViQTokenizer(tiny_train_config(tmp_path, HEAD, DECODER, *overrides), llm_hidden_size=64)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok_images")
    return [make_image(folder / f"{i}.png", size=s, seed=i) for i, s in enumerate([(64, 48), (32, 32), (80, 96)])]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer(tmp_path_factory.mktemp("tok"))


def pack(tok, paths):
    return PackedImages.from_images([load_native_image(p, tok.cfg.data.image, 16) for p in paths])


class Batch:
    def __init__(self, images):
        self.images = images


def test_codes_shape_and_range(tok, paths):
    encoded = tok.encode(paths)
    for e, p in zip(encoded, paths):
        grid = load_native_image(p, tok.cfg.data.image, 16).grid
        assert e.codes.shape == (2 * grid[0], 2 * grid[1])  # one code per 8x8 pixels
        assert e.size == (grid[1] * 16, grid[0] * 16)
        assert e.codes.dtype == torch.int64 and 0 <= e.codes.min() and e.codes.max() < 15360


def test_offline_embeddings_equal_online_features_exactly(tok, paths):
    packed = pack(tok, paths)
    with torch.no_grad():
        online = packed.split(tok.visual(Batch(packed)).embeddings)
    offline = tok.embed([e.codes for e in tok.encode(paths)])
    for a, b in zip(online, offline):
        assert torch.equal(a, b)


def test_codes_independent_of_pack_and_batch(tok, paths):
    head = tok.visual.head
    packed = pack(tok, paths)
    with torch.no_grad():
        together = packed.split(head.pre_quantization(tok.visual.encoder(packed), packed))
        for k, path in enumerate(paths):
            alone = pack(tok, [path])
            z = head.pre_quantization(tok.visual.encoder(alone), alone)
            assert torch.equal(z, together[k])  # pre-rounding values, bit for bit
    batched = tok.encode(paths)
    for k, path in enumerate(paths):
        assert torch.equal(tok.encode([path])[0].codes, batched[k].codes)
    assert torch.equal(tok.encode(paths[::-1])[0].codes, batched[-1].codes)


def test_position_awareness(tmp_path, paths):
    """Without RoPE the head is permutation-equivariant over an image's tokens; with it, not."""
    for rope in (False, True):
        tok = tokenizer(tmp_path / str(rope), f"model.head.rope={str(rope).lower()}")
        head = tok.visual.head
        images = pack(tok, paths[:1])
        n = images.num_tokens
        with torch.no_grad():
            # Sharpen attention so positions matter at initialisation (random weights attend ~uniformly).
            for name, p in head.subtoken_blocks.named_parameters():
                if "linear_qkv.weight" in name:
                    p.mul_(8.0)
            tokens = torch.randn(n, 64, generator=torch.Generator().manual_seed(1)).to(tok.device)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(2)).to(tok.device)
            z = head.pre_quantization(tokens, images)
            z_perm = head.pre_quantization(tokens[perm], images)
            codes, permuted = head.indices(z), head.indices(z_perm)
        if rope:
            assert (z_perm - z[perm]).abs().max() > 0.1
            assert not torch.equal(permuted, codes[perm])
        else:
            assert torch.allclose(z_perm, z[perm], atol=1e-4)
            assert (permuted == codes[perm]).float().mean() > 0.99


def test_save_load_round_trip_and_errors(tok, paths, tmp_path):
    from viq_megatron.tokenizer import TokenizerError, ViQTokenizer

    tok.save(tmp_path / "t")
    loaded = ViQTokenizer.load(tmp_path / "t")
    for name, tensor in tok.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.encode(paths)[2].codes, tok.encode(paths)[2].codes)
    images = loaded.decode([e.codes for e in loaded.encode(paths)])
    assert [im.size for im in images] == [e.size for e in tok.encode(paths)]

    (tmp_path / "t/model.safetensors").rename(tmp_path / "t/moved")
    with pytest.raises(TokenizerError, match=r"model.safetensors: missing$"):
        ViQTokenizer.load(tmp_path / "t")
    (tmp_path / "t/moved").rename(tmp_path / "t/model.safetensors")
    config = json.loads((tmp_path / "t/viq_tokenizer.json").read_text())
    config["model"]["head"]["subtoken_size"] = 48
    (tmp_path / "t/viq_tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError) as e:
        ViQTokenizer.load(tmp_path / "t")
    assert "\n" not in str(e.value) and "has shape" in str(e.value) and "visual.head." in str(e.value)


def test_non_finite_weights_or_features_never_become_codes(tok, paths, tmp_path):
    from safetensors.torch import load_file, save_file

    from viq_megatron.data.images import ImageError
    from viq_megatron.tokenizer import TokenizerError, ViQTokenizer

    tok.save(tmp_path / "t")
    loaded = ViQTokenizer.load(tmp_path / "t")

    def nan_for_the_second_image(module, inputs, output):
        start, end = inputs[0].cu_seqlens[1:3].tolist()
        output[start:end, 0] = float("nan")
        return output

    hook = loaded.visual.encoder.register_forward_hook(nan_for_the_second_image)
    with pytest.raises(ImageError, match=rf"^{paths[1]}: the tokenizer's features are NaN or infinite"):
        loaded.encode(paths)
    hook.remove()
    assert [torch.equal(a.codes, b.codes) for a, b in zip(loaded.encode(paths), tok.encode(paths))] == [True] * 3

    weights = load_file(tmp_path / "t/model.safetensors")
    name = sorted(weights)[3]
    weights[name][0] = float("inf")
    save_file(weights, tmp_path / "t/model.safetensors")
    with pytest.raises(TokenizerError, match=rf"model.safetensors: tensor {name} holds NaN or infinite values"):
        ViQTokenizer.load(tmp_path / "t")


def test_the_callers_random_generators_are_left_as_they_were(tok, paths, tmp_path):
    """Loading builds modules with random initial weights before the saved ones replace them."""
    import random

    import numpy as np

    from viq_megatron.tokenizer import ViQTokenizer

    tok.save(tmp_path / "t")

    def seeded_draws(between=lambda: None):
        random.seed(7), np.random.seed(7), torch.manual_seed(7)
        between()
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    def use_a_tokenizer():
        loaded = ViQTokenizer.load(tmp_path / "t")
        loaded.decode([e.codes for e in loaded.encode(paths)])

    assert seeded_draws(use_a_tokenizer) == seeded_draws()


def test_a_library_user_gets_a_plain_module_and_torch_as_it_was(tok, paths, tmp_path):
    """In a fresh interpreter: loading and using the tokenizer starts no distributed runtime,
    patches nothing in torch, adds nothing to sys.modules' GPU extras, and leaves the RNG alone."""
    tok.save(tmp_path / "t")
    script = textwrap.dedent(f"""
        import json, random, sys
        import numpy as np, torch
        random.seed(3); np.random.seed(3); torch.manual_seed(3)
        torch_attrs = {{n: getattr(torch.Tensor, n) for n in ("type", "cuda")}}
        cuda_attrs = {{n: getattr(torch.cuda, n) for n in ("current_device", "synchronize", "get_rng_state")}}
        rng = (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())
        extras = {{n: sys.modules.get(n, "absent") for n in ("transformer_engine", "apex")}}
        from viq_megatron import ViQTokenizer
        tok = ViQTokenizer.load({str(tmp_path / "t")!r})
        codes = [e.codes for e in tok.encode({[str(p) for p in paths]!r})]
        tok.decode(codes)
        print(json.dumps({{
            "runtime": torch.distributed.is_initialized(),
            "torch_patched": [n for n, f in torch_attrs.items() if getattr(torch.Tensor, n) is not f],
            "cuda_patched": [n for n, f in cuda_attrs.items() if getattr(torch.cuda, n) is not f],
            "rng_kept": rng[0] == random.getstate() and rng[1] == np.random.get_state()[1].tolist()
                        and torch.equal(rng[2], torch.get_rng_state()),
            "extras_changed": [n for n, v in extras.items() if sys.modules.get(n, "absent") is not v],
            "codes": [c.tolist() for c in codes]}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["runtime"] is False and report["torch_patched"] == [] and report["cuda_patched"] == []
    assert report["rng_kept"] and report["extras_changed"] == []
    assert report["codes"] == [e.codes.tolist() for e in tok.encode(paths)]  # the same codes as in this process


def test_standalone_layers_compute_what_the_training_layers_compute(tok, paths, megatron_world):
    """The tokenizer's standalone modules vs the same weights in Megatron-Core's parallel layers
    (as stage-2 training builds them): bit-identical features and codes."""
    from viq_megatron.models.provider import quantized_input
    from viq_megatron.models.sharding import load_full_state_dict

    online = quantized_input(tok.cfg, tok.llm_hidden_size).eval()
    load_full_state_dict(
        online, {k[len("visual.") :]: v for k, v in tok.state_dict().items() if k.startswith("visual.")}
    )
    batch = Batch(pack(tok, paths))
    with torch.no_grad():
        ours, theirs = tok.visual(batch), online(batch)
    assert type(online.encoder.transformer.layers[0].mlp.linear_fc1).__name__ == "ColumnParallelLinear"
    assert type(tok.visual.encoder.transformer.layers[0].mlp.linear_fc1).__name__ == "SingleRankLinear"
    for name in ("encoder_tokens", "bottleneck", "features", "embeddings"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
