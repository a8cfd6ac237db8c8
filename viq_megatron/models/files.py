"""The directories our models are saved as: weights in `model.safetensors` beside a JSON config.

    LLM checkpoint       llm_arch.json      (tools/convert_hf_checkpoint.py; models/hf_llm.py)
    imported encoder     encoder.json       (tools/convert_vision_checkpoint.py; models/siglip.py)
    ViQTokenizer         viq_tokenizer.json (tools/export_tokenizer.py; tokenizer.py)
    HF export's visual   viq_visual/config.json (tools/export_hf.py; hf_adapter.py)

The two visual configs are written by `visual_config`, and a tokenizer directory is read by
`read_tokenizer_files`, which refuses a file it cannot use in one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from viq_megatron.config import Config, config_from_dict
from viq_megatron.runtime.errors import InputError, first_line

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_CONFIG = "viq_tokenizer.json"


class TokenizerError(InputError):
    """A tokenizer directory that cannot be loaded; one line naming the file."""


def visual_config(cfg: Config, llm_hidden_size: int, head: bool = True, decoder: bool = False) -> dict:
    """What rebuilds a saved visual model: the encoder (its `init_from` dropped: the saved weights
    replace an imported encoder's), the head and pixel decoder when saved, the dtype, the image
    rules, and the LLM width the projector feeds."""
    model = {"encoder": {**dataclasses.asdict(cfg.model.encoder), "init_from": ""}}
    if head:
        model["head"] = dataclasses.asdict(cfg.model.head)
    model["params_dtype"] = cfg.model.params_dtype
    if decoder:
        model["decoder"] = dataclasses.asdict(cfg.model.decoder)
    return {"model": model, "data": {"image": dataclasses.asdict(cfg.data.image)}, "llm_hidden_size": llm_hidden_size}


def read_tokenizer_config(directory: str | Path) -> tuple[Config, int]:
    """(model config, LLM width its projector feeds) of a saved tokenizer directory."""
    config_file = Path(directory) / TOKENIZER_CONFIG
    if not config_file.is_file():
        raise TokenizerError(f"{config_file}: missing")
    try:
        raw = json.loads(config_file.read_text())
        llm_hidden_size = int(raw.pop("llm_hidden_size"))
        return config_from_dict(raw, str(config_file)), llm_hidden_size
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TokenizerError(f"{config_file}: {first_line(e)}") from None


def read_tokenizer_files(directory: str | Path) -> tuple[Config, int, dict[str, torch.Tensor]]:
    """(model config, LLM width its projector feeds, weights) of a saved tokenizer directory;
    weights holding NaN or infinite values are refused."""
    weights_file = Path(directory) / WEIGHTS_FILE
    cfg, llm_hidden_size = read_tokenizer_config(directory)
    if not weights_file.is_file():
        raise TokenizerError(f"{weights_file}: missing")
    try:
        state = load_file(str(weights_file))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise TokenizerError(f"{weights_file}: not a readable safetensors file ({e})") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TokenizerError(f"{weights_file}: tensor {name} holds NaN or infinite values (a diverged run?)")
    return cfg, llm_hidden_size, state
