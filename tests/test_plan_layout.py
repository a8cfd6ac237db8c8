"""tools/plan_layout.py (viq_megatron/benchmarks/layout.py): its parameter counts are the real models';
its layouts fit."""

import pytest
import torch
from conftest import tiny_config

from viq_megatron.config import LLMArch


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_parameter_counts_equal_the_built_models(megatron_world, tied, bias):
    from viq_megatron.benchmarks.layout import encoder_parameters, llm_parameters
    from viq_megatron.models.llm import build_llm
    from viq_megatron.models.provider import build_encoder

    arch = LLMArch(64, 3, 4, 2, 96, 200, qkv_bias=bias, tie_word_embeddings=tied)
    llm = build_llm(arch, 1, torch.float32, "local")
    assert llm_parameters(arch) == sum(p.numel() for p in llm.parameters())
    cfg = tiny_config()
    encoder, _ = build_encoder(cfg)
    assert encoder_parameters(cfg.model.encoder) == sum(p.numel() for p in encoder.parameters())


def test_planned_layouts_fit_and_tensor_parallelism_divides_kv_groups(capsys):
    from viq_megatron.cli.plan_layout import main

    assert main(["--llm", "qwen2.5-7b", "--encoder", "so400m", "--seq", "16384", "--memory-gib", "60"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    for row in rows:
        tp, pp, dp = (int(x) for x in row[5].split(" x "))
        assert tp * pp * dp == 8 and 4 % tp == 0 and 28 % pp == 0
        assert float(row[6]) <= 60
