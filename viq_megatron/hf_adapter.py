"""Run a model exported by tools/export_hf.py with Hugging Face transformers.

The exported directory DIR is a standard Hugging Face causal LM (LlamaForCausalLM or
Qwen2ForCausalLM: `AutoModelForCausalLM.from_pretrained(DIR)` loads it, and
`AutoTokenizer.from_pretrained(DIR)` its tokenizer when the LLM came from an HF checkpoint)
plus DIR/viq_visual/: our visual input (encoder [+ ViQ head] + projector: config.json,
model.safetensors; tokenizer.model too for runs with a SentencePiece tokenizer). The one
adapter an evaluation harness needs: the LLM's input embeddings with each image's
placeholder tokens replaced by our visual embeddings, then `generate(inputs_embeds=...)`.

    from viq_megatron.hf_adapter import ViQForHF
    model = ViQForHF("DIR")                                    # device="cuda" for a GPU
    model.answer("What colour is the circle?", ["scene.png"])  # greedy, e.g. "red"

Step by step, to port into a harness's own loop (what `answer` does):
 1. lm = AutoModelForCausalLM.from_pretrained(DIR); visual = ViQVisual(DIR / "viq_visual");
    text = HFTokenizer(DIR) (SentencePieceTokenizer(DIR / "viq_visual/tokenizer.model")).
 2. Lay the question out as training did, up to where the answer starts:
    prompt = encode_sample(Sample("q", (Turn("user", "<image>\nQ"),), (image,)), text,
    visual.rules, visual.patch, None, generation_prompt=True): `prompt.token_ids` are the
    chat template's tokens (or "User: <image>\nQ\nAssistant:" without a template) with one
    slot per 16x16 patch of each image at its native resolution (`prompt.visual_slots`;
    visual.rules: the pixel budget, mean and std the model trained with).
 3. embeds = lm.get_input_embeddings()(ids); embeds[0, prompt.visual_slots] = visual(prompt),
    one row per patch, images in order.
 4. lm.generate(inputs_embeds=embeds, attention_mask=ones, do_sample=False, max_new_tokens=N,
    eos_token_id=stop_ids(text), suppress_tokens=range(text.vocab_size, lm's vocab)):
    the answer's tokens only; decode them up to the first stop id. stop_ids
    (viq_megatron.evaluate) is EOS plus the template's end of turn; generation_config.json
    holds the same list.
Batches work the same way with left padding (zero embeddings, attention mask 0).

The visual input needs viq_megatron: its Megatron-Core layers are built standalone (no
process group, as ViQTokenizer's are); the LLM is plain transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from viq_megatron.config import ConfigError, config_from_dict
from viq_megatron.data.conversations import Sample
from viq_megatron.data.images import ImageSource
from viq_megatron.data.multimodal import EncodedSample, encode_sample, pack_samples
from viq_megatron.data.text import IMAGE_PLACEHOLDER, HFTokenizer, SentencePieceTokenizer, Turn, stop_ids
from viq_megatron.models.files import WEIGHTS_FILE
from viq_megatron.models.provider import encoder_input, quantized_input
from viq_megatron.models.sharding import load_full_state_dict

VISUAL_DIR = "viq_visual"
CONFIG_FILE = "config.json"
TEXT_TOKENIZER_FILE = "tokenizer.model"


class ViQVisual:
    """Images -> LLM input embeddings, one per 16x16 patch: the exported visual input."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        raw = json.loads((directory / CONFIG_FILE).read_text())
        kind, hidden = raw.pop("visual"), int(raw.pop("llm_hidden_size"))
        cfg = config_from_dict(raw, str(directory / CONFIG_FILE))
        if kind == "quantized":
            self.module = quantized_input(cfg, hidden, standalone=True)
        elif kind == "encoder":
            self.module = encoder_input(cfg, hidden, standalone=True)
        else:
            raise ConfigError(f"{directory / CONFIG_FILE}: visual: unknown kind {kind!r}")
        load_full_state_dict(self.module, load_file(str(directory / WEIGHTS_FILE)))
        self.module.eval()
        self.rules, self.patch = cfg.data.image, cfg.model.encoder.patch_size

    @torch.no_grad()
    def __call__(self, encoded: EncodedSample) -> torch.Tensor:
        """The embeddings of a laid-out sample's visual slots [slots, hidden], images in order."""
        return self.module(pack_samples([encoded])).embeddings


class ViQForHF:
    """An exported model: the HF causal LM, our visual input, the text tokenizer it trained with."""

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu"):
        directory = Path(directory)
        self.lm = AutoModelForCausalLM.from_pretrained(str(directory)).to(device).eval()
        sentencepiece = directory / VISUAL_DIR / TEXT_TOKENIZER_FILE
        self.text = SentencePieceTokenizer(sentencepiece) if sentencepiece.is_file() else HFTokenizer(directory)
        self.visual = ViQVisual(directory / VISUAL_DIR)
        self.stop = sorted(stop_ids(self.text))

    def layout(self, turns: Sequence[Turn], images: Sequence[ImageSource] = ()) -> EncodedSample:
        """Token ids with visual slots, exactly as training laid the conversation out up to the answer."""
        return encode_sample(
            Sample("question", tuple(turns), tuple(images)),
            self.text,
            self.visual.rules,
            self.visual.patch,
            None,
            generation_prompt=True,
        )

    @torch.no_grad()
    def inputs_embeds(self, encoded: EncodedSample) -> torch.Tensor:
        """[1, tokens, hidden]: the LLM's token embeddings with the visual slots filled."""
        embed = self.lm.get_input_embeddings()
        embeds = embed(torch.tensor([encoded.token_ids], device=embed.weight.device))
        if encoded.visual_slots:
            embeds[0, encoded.visual_slots] = self.visual(encoded).to(embeds.device, embeds.dtype)
        return embeds

    @torch.no_grad()
    def answer(self, question: str, images: Sequence[ImageSource] = (), max_new_tokens: int = 32) -> str:
        """Greedy answer to one question about `images` (placeholders added in front when the
        question has none)."""
        if images and IMAGE_PLACEHOLDER not in question:
            question = "\n".join([IMAGE_PLACEHOLDER] * len(images) + [question])
        embeds = self.inputs_embeds(self.layout([Turn("user", question)], images))
        vocab = self.lm.get_input_embeddings().weight.shape[0]
        out = self.lm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop,
            pad_token_id=self.text.eos_id,
            suppress_tokens=list(range(self.text.vocab_size, vocab)) or None,
        )
        ids = out[0].tolist()
        ends = [k for k, i in enumerate(ids) if i in self.stop]
        return self.text.decode(ids[: ends[0]] if ends else ids).strip()
