"""Export a trained multimodal model for Hugging Face-based evaluation harnesses.

    python tools/export_hf.py --config CFG --checkpoint RUN_DIR --out DIR [--text-tokenizer PATH] [key.sub=value ...]

DIR gets the LLM as a standard LlamaForCausalLM / Qwen2ForCausalLM directory (config.json,
generation_config.json, model.safetensors; the tokenizer files when the LLM came from an HF
checkpoint) and DIR/viq_visual/: the visual input that fills each image's placeholder tokens
(encoder [+ ViQ head] + projector: config.json, model.safetensors; tokenizer.model for runs
with a SentencePiece tokenizer). viq_megatron/hf_adapter.py runs the two together and says
how to port that into a harness. LoRA adapters are merged into the LLM's weights.

The model is built and loaded as `python -m viq_megatron.evaluate` builds it (same config,
same checkpoint rules), in one process: the checkpoint may come from any parallel layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from viq_megatron.config import ParallelConfig, parse_command_line
from viq_megatron.data.text import HFTokenizer, stop_ids
from viq_megatron.hf_adapter import CONFIG_FILE, TEXT_TOKENIZER_FILE, VISUAL_DIR
from viq_megatron.inference import load_model, load_text_tokenizer
from viq_megatron.models.files import WEIGHTS_FILE, visual_config
from viq_megatron.models.hf_llm import save_hf_causal_lm
from viq_megatron.models.provider import llm_arch
from viq_megatron.models.sharding import full_state_dict
from viq_megatron.models.specs import local_layer_names, resolve_transformer_impl
from viq_megatron.runtime.distributed import initialize
from viq_megatron.runtime.errors import one_line_errors


def llm_weights(llm, lora_scale: float) -> dict:
    """The LLM's weights in our TP=1 layout (local layer names), LoRA adapters merged:
    W + scale * B A is what the adapter's forward hook computes."""
    state = {k: v for k, v in full_state_dict(llm).items() if not k.endswith("_extra_state")}
    for name in [k for k in state if k.endswith(".lora_a")]:
        base = name[: -len("lora_a")]
        a, b = state.pop(name), state.pop(base + "lora_b")
        state[base + "weight"] = state[base + "weight"] + lora_scale * (b.float() @ a.float()).to(a.dtype)
    return local_layer_names(state)  # a TE model's fused norms under their local names


def save_visual(model, visual_cfg, impl: str, out: Path) -> None:
    """The visual input's weights (TP=1) and the config that rebuilds it (hf_adapter.ViQVisual)."""
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in full_state_dict(model.visual).items() if not k.endswith("_extra_state")}
    save_file(weights, str(out / WEIGHTS_FILE))
    head = getattr(model.visual, "head", None) is not None
    config = visual_config(visual_cfg, model.llm.config.hidden_size, head=head)
    config["visual"] = "quantized" if head else "encoder"
    config["model"]["transformer_impl"] = impl
    config["data"]["tokens_per_pack"] = visual_cfg.data.tokens_per_pack
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace, object]:
    """(the parser, the arguments, the run's config, set for one process holding the whole model)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run's output_dir, or one of its checkpoints")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--text-tokenizer", help="SentencePiece .model or HF tokenizer folder (default: the run's)")
    args, cfg = parse_command_line(parser, argv, required=False)
    return parser, args, dataclasses.replace(cfg, parallel=ParallelConfig())


def main(argv: list[str] | None = None) -> int:
    parser, args, cfg = parse(argv)
    with one_line_errors(parser):
        initialize(cfg.parallel, cfg.seed, environ={})
        text = load_text_tokenizer(cfg, args.checkpoint, args.text_tokenizer)
        model, visual_cfg = load_model(cfg, args.checkpoint)
        lora = cfg.model.llm.lora
        save_hf_causal_lm(
            llm_weights(model.llm, lora.alpha / lora.rank if lora.rank else 0.0),
            llm_arch(cfg),
            args.out,
            [text.eos_id, *sorted(stop_ids(text) - {text.eos_id})],
        )
        save_visual(model, visual_cfg, resolve_transformer_impl(cfg.model.transformer_impl), args.out / VISUAL_DIR)
    save_text_tokenizer(text, args.out)
    print(f"wrote {args.out}")
    return 0


def save_text_tokenizer(text, out: Path) -> None:
    """An HF tokenizer's files beside the LLM; a SentencePiece model into the visual folder
    (hf_adapter reads it there)."""
    if isinstance(text, HFTokenizer):
        text.tokenizer.save_pretrained(out)
    else:
        shutil.copyfile(text.model_file, out / VISUAL_DIR / TEXT_TOKENIZER_FILE)
