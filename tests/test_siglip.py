"""SigLIP / SigLIP2 import: our encoder and pooling head compute what transformers computes."""

import json

import pytest
import torch
from conftest import ROOT, tiny_config, torchrun
from safetensors.torch import load_file, save_file

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=16)


def encoder_overrides(directory, side: int) -> list[str]:
    return [
        "model.encoder.hidden_size=64",
        "model.encoder.num_layers=2",
        "model.encoder.num_attention_heads=4",
        "model.encoder.ffn_hidden_size=128",
        f"model.encoder.position_embedding_size={side}",
        f"model.encoder.init_from={directory}",
    ]


def randomized(model):
    """transformers initialises norms to 1/0 and the probe to a fixed value: make every tensor random."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def naflex(tmp_path_factory):
    """A tiny random Siglip2 (NaFlex) tower, its outputs on two native-resolution images, converted."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    folder = tmp_path_factory.mktemp("naflex")
    model = randomized(Siglip2VisionModel(Siglip2VisionConfig(**SIZES, num_patches=16)))
    model.save_pretrained(folder / "hf")
    grids = [(3, 5), (6, 2)]
    torch.manual_seed(1)
    patches = [torch.randn(h * w, 3 * 16 * 16) for h, w in grids]
    hidden, pooled = [], []
    with torch.no_grad():
        for grid, x in zip(grids, patches):
            out = model(
                pixel_values=x[None],
                pixel_attention_mask=torch.ones(1, len(x), dtype=torch.long),
                spatial_shapes=torch.tensor([grid]),
            )
            hidden.append(out.last_hidden_state[0])
            pooled.append(out.pooler_output[0])
    reference = {
        "patches": torch.cat(patches),
        "grids": torch.tensor(grids),
        "hidden": torch.cat(hidden),
        "pooled": torch.stack(pooled),
    }
    torch.save(reference, folder / "reference.pt")
    convert(folder / "hf", folder / "ours")
    return folder, reference


def convert(source, out, *extra) -> None:
    from viq_megatron.cli.convert_vision import main

    assert main(["--source", str(source), "--out", str(out), *extra]) == 0


def ours(directory, side, patches, grids):
    """Our encoder (and pooling head) from a converted directory, at TP=1."""
    from viq_megatron.data.packing import PackedImages
    from viq_megatron.models.provider import build_encoder, build_pooling_head

    cfg = tiny_config(*encoder_overrides(directory, side))
    encoder, _ = build_encoder(cfg)
    pooling = build_pooling_head(cfg)
    lengths = [h * w for h, w in grids.tolist()]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    images = PackedImages(patches, grids, cu, [str(i) for i in range(len(lengths))])
    with torch.no_grad():
        tokens = encoder.eval()(images)
        return tokens, (pooling(tokens, cu) if pooling is not None else None)


def test_naflex_native_resolution_matches_transformers(naflex, megatron_world):
    folder, ref = naflex
    tokens, pooled = ours(folder / "ours", 4, ref["patches"], ref["grids"])
    assert (tokens - ref["hidden"]).abs().max() < 1e-4
    assert (pooled - ref["pooled"]).abs().max() < 1e-4


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    """A tiny random SigLIP tower (64x64 pixels, 4x4 patches), its outputs on two images, converted."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    folder = tmp_path_factory.mktemp("fixed")
    model = randomized(SiglipVisionModel(SiglipVisionConfig(**SIZES, image_size=64)))
    model.save_pretrained(folder / "hf")
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    # (C, H, W) -> patches flattened as (p, p, C), row-major over the 4x4 grid
    patches = pixels.reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 3, 5, 1).reshape(2 * 16, 3 * 16 * 16)
    reference = {
        "patches": patches,
        "grids": torch.tensor([[4, 4], [4, 4]]),
        "hidden": out.last_hidden_state.reshape(-1, 64),
        "pooled": out.pooler_output,
    }
    torch.save(reference, folder / "reference.pt")
    convert(folder / "hf", folder / "ours")
    return folder, reference, model


def test_fixed_resolution_siglip_and_its_timm_layout_match_transformers(fixed, tmp_path, megatron_world):
    folder, ref, model = fixed
    tokens, pooled = ours(folder / "ours", 4, ref["patches"], ref["grids"])
    assert (tokens - ref["hidden"]).abs().max() < 1e-4
    assert (pooled - ref["pooled"]).abs().max() < 1e-4

    # The same weights under timm / open_clip names (fused qkv, the probe's q and kv apart).
    hf = {k.split("vision_model.")[-1]: v for k, v in model.state_dict().items()}
    timm = {
        "visual.trunk.patch_embed.proj.weight": hf["embeddings.patch_embedding.weight"],
        "visual.trunk.patch_embed.proj.bias": hf["embeddings.patch_embedding.bias"],
        "visual.trunk.pos_embed": hf["embeddings.position_embedding.weight"][None],
        "visual.trunk.norm.weight": hf["post_layernorm.weight"],
        "visual.trunk.norm.bias": hf["post_layernorm.bias"],
        "visual.trunk.attn_pool.latent": hf["head.probe"],
    }
    for part in ("weight", "bias"):
        q, kv = hf[f"head.attention.in_proj_{part}"].split([64, 128])
        timm[f"visual.trunk.attn_pool.q.{part}"], timm[f"visual.trunk.attn_pool.kv.{part}"] = q, kv
        timm[f"visual.trunk.attn_pool.proj.{part}"] = hf[f"head.attention.out_proj.{part}"]
        timm[f"visual.trunk.attn_pool.norm.{part}"] = hf[f"head.layernorm.{part}"]
        for fc in ("fc1", "fc2"):
            timm[f"visual.trunk.attn_pool.mlp.{fc}.{part}"] = hf[f"head.mlp.{fc}.{part}"]
        for i in range(2):
            layer, block = f"encoder.layers.{i}.", f"visual.trunk.blocks.{i}."
            timm[f"{block}attn.qkv.{part}"] = torch.cat([hf[f"{layer}self_attn.{x}_proj.{part}"] for x in "qkv"])
            timm[f"{block}attn.proj.{part}"] = hf[f"{layer}self_attn.out_proj.{part}"]
            for theirs, mine in (
                ("norm1", "layer_norm1"),
                ("norm2", "layer_norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                timm[f"{block}{theirs}.{part}"] = hf[f"{layer}{mine}.{part}"]
    save_file({k: v.contiguous() for k, v in timm.items()}, str(tmp_path / "open_clip.safetensors"))
    convert(tmp_path / "open_clip.safetensors", tmp_path / "from_timm", "--num-attention-heads", "4")
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            load_file(str(folder / "ours/model.safetensors")).values(),
            load_file(str(tmp_path / "from_timm/model.safetensors")).values(),
        )
    )


def test_missing_or_misshaped_tensor_is_one_line_naming_it(naflex, tmp_path, capsys):
    from viq_megatron.cli.convert_vision import main

    folder, _ = naflex
    weights = load_file(str(next((folder / "hf").glob("*.safetensors"))))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/config.json").write_text((folder / "hf/config.json").read_text())
    name = next(k for k in weights if k.endswith("encoder.layers.1.self_attn.k_proj.weight"))
    for broken, problem in (
        (lambda w: w.pop(name), "is missing"),
        (lambda w: w.__setitem__(name, torch.zeros(64, 32)), "has shape (64, 32)"),
    ):
        state = dict(weights)
        broken(state)
        save_file(state, str(tmp_path / "hf/model.safetensors"))
        assert main(["--source", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 1
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "encoder.layers.1.self_attn.k_proj.weight" in error
        assert problem in error


def test_config_sizes_must_agree_with_the_converted_encoder(naflex, megatron_world):
    from viq_megatron.config import ConfigError
    from viq_megatron.models.provider import build_encoder

    folder, _ = naflex
    with pytest.raises(ConfigError, match="model.encoder.position_embedding_size: 8 differs"):
        build_encoder(tiny_config(*encoder_overrides(folder / "ours", 8)))
    # How a run would initialise the encoder is no size: not in encoder.json, never compared.
    assert "init_method_std" not in json.loads((folder / "ours" / "encoder.json").read_text())
    build_encoder(tiny_config(*encoder_overrides(folder / "ours", 4), "model.encoder.init_method_std=0.07"))


def test_tensor_parallel_import_and_stage1_from_it(naflex, fixed, tmp_path):
    """TP=2 gives transformers' outputs at native and fixed resolution; `model.encoder.init_from`
    starts a stage-1 run from the import."""
    result = tmp_path / "result.json"
    torchrun(2, str(ROOT / "tests/workers/siglip_checks.py"), str(naflex[0]), str(fixed[0]), str(result), str(tmp_path))
    checks = json.loads(result.read_text())
    for resolution in ("native", "fixed"):
        assert checks[f"{resolution}_tp2_hidden"] < 1e-4 and checks[f"{resolution}_tp2_pooled"] < 1e-4
    assert checks["teacher_is_imported"] and checks["student_starts_imported"] and checks["has_pooling"]
    assert len(checks["losses"]) == 2 and all(l == l for l in checks["losses"])  # finite, two steps
