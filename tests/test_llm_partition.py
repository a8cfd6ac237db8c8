"""hf_llm.partition_of, the name table that pre-shards converted checkpoints (the converter has
weights but no Megatron model to read split attributes from), against those attributes.
tests/test_llm.py checks Llama (tied embeddings); Qwen2 adds the QKV bias and an untied output layer."""

import torch
from hf_models import make_tiny_hf

from viq_megatron.models import hf_llm
from viq_megatron.models.llm import build_llm
from viq_megatron.models.pretrained import import_hf_llm


def test_partition_table_matches_megatron_attributes_with_bias_and_untied_output(tmp_path, megatron_world):
    arch = import_hf_llm(make_tiny_hf("qwen2", tmp_path / "hf"), tmp_path / "ours")
    model = build_llm(arch, 1, torch.float32, "local")
    names = {name for name, _ in model.named_parameters()}
    assert {"output_layer.weight", "decoder.layers.0.self_attention.linear_qkv.bias"} <= names
    for name, param in model.named_parameters():
        expected = (
            (param.partition_dim, getattr(param, "partition_stride", 1))
            if getattr(param, "tensor_model_parallel", False)
            else None
        )
        assert hf_llm.partition_of(name) == expected, name
