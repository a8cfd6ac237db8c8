"""The Megatron-Core LLM vs transformers; checkpoint conversion; packed multimodal loss."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from hf_models import TINY_HF, make_tiny_hf
from safetensors.torch import load_file

from viq_megatron.config import LLMArch
from viq_megatron.models import hf_llm
from viq_megatron.models.hf_llm import CheckpointError, load_llm_weights, read_arch
from viq_megatron.models.llm import build_llm
from viq_megatron.models.pretrained import import_hf_llm


def hf_logits(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    with torch.no_grad():
        return model(ids).logits


def our_logits(checkpoint, ids):
    model = build_llm(read_arch(checkpoint), 1, torch.float32, "local").eval()
    load_llm_weights(model, checkpoint)
    device = next(model.parameters()).device
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        return (
            model(
                input_ids=ids.to(device),
                position_ids=positions.to(device),
                attention_mask=None,
                runtime_gather_output=True,
            )
            .float()
            .cpu()
        )


@pytest.mark.parametrize("kind", sorted(TINY_HF))
def test_logits_match_transformers_and_export_round_trips(kind, tmp_path, megatron_world):
    hf_dir = make_tiny_hf(kind, tmp_path / "hf")
    ours = tmp_path / "ours"
    arch = import_hf_llm(hf_dir, ours, tensor_parallel=2)
    assert arch.model_type == kind and arch.qkv_bias == (kind == "qwen2")
    assert arch.rotary_base == TINY_HF[kind]["rope_theta"]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = hf_logits(hf_dir, ids)
    assert (our_logits(ours, ids) - reference).abs().max() < 1e-4

    exported = tmp_path / "exported"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/convert_hf_checkpoint.py"),
            "export",
            "--checkpoint",
            str(ours),
            "--out",
            str(exported),
        ],
        check=True,
        capture_output=True,
    )
    original, back = load_file(str(hf_dir / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert set(original) == set(back)
    for name in original:
        assert torch.equal(original[name], back[name]), name
    assert torch.equal(hf_logits(exported, ids), reference)


def test_broken_checkpoints_name_the_tensor(tmp_path):
    hf_dir = make_tiny_hf("qwen2", tmp_path / "hf")
    weights = load_file(str(hf_dir / "model.safetensors"))
    config = json.loads((hf_dir / "config.json").read_text())
    arch = hf_llm.arch_from_hf_config(config)
    missing = dict(weights)
    del missing["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(CheckpointError, match=r"^src: tensor model.layers.1.self_attn.k_proj.bias is missing$"):
        hf_llm.hf_to_megatron(missing, arch, source="src")
    misshaped = dict(weights)
    misshaped["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)
    with pytest.raises(
        CheckpointError,
        match=r"model.layers.0.mlp.down_proj.weight has shape \(64, 95\), "
        r"expected \(64, 96\)",
    ):
        hf_llm.hf_to_megatron(misshaped, arch, source="src")
    extra = {**weights, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}
    with pytest.raises(CheckpointError, match=r"^src: tensor model.layers.0.self_attn.o_proj.bias is not supported"):
        hf_llm.hf_to_megatron(extra, arch, source="src")
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not llama or qwen2"):
        hf_llm.arch_from_hf_config({**config, "model_type": "gpt2"})


def test_tp_shards_follow_megatron_partition_attributes(tmp_path, megatron_world):
    """The name rules used to pre-shard checkpoints agree with the attributes megatron-core
    sets on its own parameters."""
    hf_dir = make_tiny_hf("llama", tmp_path / "hf")
    arch = import_hf_llm(hf_dir, tmp_path / "ours")
    model = build_llm(arch, 1, torch.float32, "local")
    for name, param in model.named_parameters():
        split = hf_llm.partition_of(name)
        if getattr(param, "tensor_model_parallel", False):
            assert split == (param.partition_dim, getattr(param, "partition_stride", 1)), name
        else:
            assert split is None, name


@pytest.mark.parametrize("std", [0.02, 0.25])
def test_init_method_std_sets_the_starting_weights(std, megatron_world):
    """`model.llm.arch.init_method_std` reaches Megatron's init: the embedding and the input
    projections are drawn at that std (the output projections at std / sqrt(2 layers))."""
    arch = LLMArch(
        hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        vocab_size=512, init_method_std=std,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_llm(arch, 1, torch.float32, "local")
    weights = dict(model.named_parameters())
    for name in ("embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight"):
        assert weights[name].std().item() == pytest.approx(std, rel=0.05), name
    assert weights["decoder.layers.0.mlp.linear_fc2.weight"].std().item() == pytest.approx(std / 2, rel=0.05)


def test_packed_loss_equals_token_weighted_mean_of_samples(tmp_path, megatron_world):
    """Several samples (one image expanding into ~100 visual tokens) in one packed row give
    the same per-token losses as each sample alone."""
    from conftest import make_image, tiny_train_config

    from viq_megatron.data.conversations import Sample
    from viq_megatron.data.multimodal import encode_sample, pack_samples
    from viq_megatron.data.text import SentencePieceTokenizer, Turn
    from viq_megatron.models.multimodal import EncoderVisualInput, Projector, VisionLanguageModel
    from viq_megatron.models.provider import build_encoder

    cfg = tiny_train_config(tmp_path, "data.image.max_pixels=32768")
    torch.manual_seed(0)
    llm = build_llm(cfg.model.llm.arch, 1, torch.float32, "local")
    encoder, _ = build_encoder(cfg)
    projector = Projector(64, 64, torch.float32).to(encoder.patch_embedding.weight.device)
    model = VisionLanguageModel(EncoderVisualInput(encoder, projector), llm).eval()
    texts = ["Describe the image.", "A red circle.", "Two blue squares on grey.", "What colour?", "green"]
    tokenizer = SentencePieceTokenizer.train(texts * 4, 300, tmp_path / "sp")
    samples = []
    for i, (size, turns) in enumerate(
        [
            ((160, 144), [Turn("user", "<image>\nDescribe the image."), Turn("assistant", "A red circle.")]),
            (None, [Turn("user", "What colour?"), Turn("assistant", "green")]),
            (
                (48, 32),
                [
                    Turn("user", "Describe the image. <image>"),
                    Turn("assistant", "Two blue squares on grey."),
                    Turn("user", "What colour?"),
                    Turn("assistant", "green"),
                ],
            ),
        ]
    ):
        images = (make_image(tmp_path / f"{i}.png", size=size, seed=i),) if size else ()
        sample = Sample(f"s{i}", tuple(turns), images)
        samples.append(encode_sample(sample, tokenizer, cfg.data.image, 16, 32))
    assert len(samples[0].visual_slots) == 90  # 160x144 -> 10 x 9 patches
    packed = pack_samples(samples)
    with torch.no_grad():
        per_token = model(packed).token_losses.cpu() * packed.loss_mask
        alone = [(model(pack_samples([s])).token_losses.cpu() * pack_samples([s]).loss_mask) for s in samples]
    bounds = packed.cu_seqlens.tolist()
    for k, single in enumerate(alone):
        assert torch.allclose(per_token[bounds[k] : bounds[k + 1]], single, atol=1e-5), k
    packed_mean = per_token.sum() / packed.loss_mask.sum()
    weighted = sum(s.sum() for s in alone) / sum(pack_samples([s]).loss_mask.sum() for s in samples)
    assert packed_mean.item() == pytest.approx(weighted.item(), rel=1e-6)
    assert packed.position_ids[bounds[1]] == 0 and packed.position_ids[bounds[2]] == 0


def test_lora_starts_at_the_base_model_and_equals_merged_weights(tmp_path, megatron_world):
    from conftest import TINY_TRAIN

    from viq_megatron.config import ConfigError, LoRAConfig, load_config
    from viq_megatron.models.lora import add_lora

    hf_dir = make_tiny_hf("qwen2", tmp_path / "hf")
    arch = import_hf_llm(hf_dir, tmp_path / "ours")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    base = our_logits(tmp_path / "ours", ids)
    adapted = build_llm(arch, 1, torch.float32, "local").eval()
    load_llm_weights(adapted, tmp_path / "ours")
    lora = LoRAConfig(rank=4, alpha=8.0)
    assert add_lora(adapted, lora) == 4 * arch.num_layers
    positions = torch.arange(16)[None]

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, position_ids=positions, attention_mask=None, runtime_gather_output=True)

    assert torch.equal(logits(adapted), base)  # B = 0: exactly the pretrained model
    merged = build_llm(arch, 1, torch.float32, "local").eval()
    load_llm_weights(merged, tmp_path / "ours")
    with torch.no_grad():
        for (_, module), (_, target) in zip(adapted.named_modules(), merged.named_modules()):
            if hasattr(module, "lora_b"):
                module.lora_b.normal_(0, 0.05)
                target.weight += (lora.alpha / lora.rank) * module.lora_b @ module.lora_a
    assert not torch.allclose(logits(adapted), base, atol=1e-3)
    assert torch.allclose(logits(adapted), logits(merged), atol=1e-4)
    with pytest.raises(ConfigError, match="LoRA adapters are not tensor-parallel yet"):
        load_config(None, [*TINY_TRAIN, "model.llm.lora.rank=4", "parallel.tensor_model_parallel_size=2"])


def test_lora_refuses_linears_that_fuse_their_layer_norm(megatron_world):
    """Under Transformer Engine, linear_qkv and linear_fc1 are LayerNormLinear modules (they hold
    `layer_norm_weight`): the hook would see the un-normalised input and the merged weight would be
    another model. TE does not run here, so a module carrying that attribute stands in for it; the
    adapter still goes on plain linears of the same model."""
    from conftest import TINY_TRAIN

    from viq_megatron.config import ConfigError, LoRAConfig, load_config
    from viq_megatron.models.lora import add_lora

    class FusedNormLinear(torch.nn.Linear):
        def __init__(self):
            super().__init__(8, 8)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(8))

    layer = torch.nn.Module()
    layer.linear_qkv, layer.linear_proj = FusedNormLinear(), torch.nn.Linear(8, 8)
    with pytest.raises(ConfigError, match=r"lora\.targets: linear_qkv fuses its layer norm"):
        add_lora(layer, LoRAConfig(rank=2))
    assert add_lora(layer, LoRAConfig(rank=2, targets=["linear_proj"])) == 1
    with pytest.raises(ConfigError, match=r"\['linear_fc1', 'linear_qkv'\] fuse their layer norm"):
        load_config(None, [*TINY_TRAIN, "model.llm.lora.rank=4", "model.transformer_impl=transformer_engine"])
    load_config(
        None,
        [
            *TINY_TRAIN,
            "model.llm.lora.rank=4",
            "model.transformer_impl=transformer_engine",
            "model.llm.lora.targets=[linear_proj, linear_fc2]",
        ],
    )


def test_fused_cross_entropy_and_swiglu_equal_the_plain_loss(tmp_path, megatron_world, monkeypatch):
    """model.fusions (on CUDA in bf16 by default): Megatron-Core's native fused cross-entropy and
    SwiGLU give today's per-token loss to 1e-5 (fp32 here). The fused cross-entropy hands back
    the logits' gradient in bf16, which is why the config allows it for bf16 models only: in
    fp32 the gradients then agree to bf16 rounding (8e-4 measured), not better. Their arithmetic
    runs eagerly here (dynamo off: compiling costs ~45 s on 2 cores); tools/gpu_check.sh runs the
    compiled kernels."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    arch = import_hf_llm(make_tiny_hf("qwen2", tmp_path / "hf"), tmp_path / "ours")
    ids = torch.randint(0, arch.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, 1)
    positions = torch.arange(40)[None]
    results = []
    for fused in (False, True):
        model = build_llm(arch, 1, torch.float32, "local", fused=fused)
        load_llm_weights(model, tmp_path / "ours")
        assert model.config.cross_entropy_loss_fusion is fused and model.config.bias_activation_fusion is fused
        loss = model(input_ids=ids, position_ids=positions, attention_mask=None, labels=labels)
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused_loss, fused_grads) = results
    assert torch.allclose(fused_loss, plain, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        assert (fused_grads[name] - grad).abs().max() <= 2**-8 * grad.abs().max(), name


def test_rope_from_per_token_angles_equals_megatron_per_sample_rope(tmp_path, megatron_world):
    """The packed LLM's RoPE, applied once to the whole row from per-token angles (no host reads),
    gives Megatron-Core's per-sample thd RoPE bit for bit (fp32), and not a run without RoPE."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from viq_megatron.models.attention import PackedRotaryParams

    arch = import_hf_llm(make_tiny_hf("llama", tmp_path / "hf"), tmp_path / "ours")
    model = build_llm(arch, 1, torch.float32, "local").eval()
    load_llm_weights(model, tmp_path / "ours")
    lengths = [7, 12, 5]
    ids = torch.randint(0, arch.vocab_size, (1, sum(lengths)), generator=torch.Generator().manual_seed(4))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
    common = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12)
    angles = positions[0, :, None].float() * model.rotary_pos_emb.inv_freq[None]

    def logits(packed):
        with torch.no_grad():
            return model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=None,
                packed_seq_params=packed,
                runtime_gather_output=True,
            )

    megatron = logits(PackedSeqParams(**common))
    ours = logits(PackedRotaryParams(**common, rotary_angles=angles, bounds=cu.tolist()))
    assert torch.equal(ours, megatron)
    assert not torch.allclose(logits(PackedRotaryParams(**common, rotary_angles=0 * angles)), megatron, atol=1e-3)
