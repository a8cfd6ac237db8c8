"""What a frozen visual representation knows about a scene: the linear-probing protocol of
tokenizer papers, on procedurally rendered scenes whose every property is exact.

Each kind is a single-label question about the scene, read off the parameters it was drawn
from: the background colour (its first tone), the number of objects, and the colour, shape and
position (a 3x3 grid cell of its centre) of the largest object. A probe per kind, an
attentive readout (a learned query over the image's tokens through multi-head key and value
projections to 128 channels, then LayerNorm and a linear layer), learns from the frozen tokens
of training scenes and is scored on held-out scenes. The scenes use their own seed
(PROBE_SEED), so no run's embedded data, and no other benchmark, shows them; held-out scenes
come from the validation index range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from viq_megatron.benchmarks.quality import scene_parameter_tokens
from viq_megatron.config import ImageConfig, config_from_dict
from viq_megatron.data.images import load_native_image
from viq_megatron.data.packing import PackedImages
from viq_megatron.data.scenes import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, VAL_START, Scene, render_scene
from viq_megatron.models.files import read_tokenizer_files
from viq_megatron.models.hf_llm import CheckpointError
from viq_megatron.models.provider import build_encoder, quantized_input
from viq_megatron.models.siglip import read_encoder_checkpoint
from viq_megatron.tokenizer import callers_random_state_kept
from viq_megatron.training.checkpoint import load_shared_weights

PROBE_SEED = 9_173_311  # scenes no run or other benchmark renders (they use the run's seed)
MAX_OBJECTS = 5  # scenes draw 1 to 5 objects
KINDS: dict[str, int] = {  # kind -> number of classes
    "background": len(BACKGROUND_COLOURS),
    "count": MAX_OBJECTS + 1,
    "colour": len(OBJECT_COLOURS),
    "shape": len(SHAPES),
    "position": 9,
}

# A frozen representation: scenes -> one [tokens, width] tensor each; most see only the images.
Features = Callable[[Sequence[Scene]], list[torch.Tensor]]
ImageFeatures = Callable[[Sequence[Image.Image]], list[torch.Tensor]]


def of_images(read: ImageFeatures) -> Features:
    return lambda scenes: read([s.image for s in scenes])


def scene_parameter_features(scenes: Sequence[Scene]) -> list[torch.Tensor]:
    """Each scene's exact parameters as tokens (the bench's oracle): the probe's own ceiling."""
    return [scene_parameter_tokens(s) for s in scenes]


def scene_labels(scene: Scene) -> dict[str, int]:
    """The class of each kind for one scene."""
    largest = max(scene.objects, key=lambda o: (o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]))
    width, height = scene.image.size
    column = min(2, 3 * (largest.bbox[0] + largest.bbox[2]) // (2 * width))
    row = min(2, 3 * (largest.bbox[1] + largest.bbox[3]) // (2 * height))
    return {
        "background": BACKGROUND_COLOURS.index(scene.background[0]),
        "count": min(len(scene.objects), MAX_OBJECTS),
        "colour": OBJECT_COLOURS.index(largest.colour),
        "shape": SHAPES.index(largest.shape),
        "position": 3 * row + column,
    }


@dataclass
class ProbeSet:
    features: list[torch.Tensor]  # [tokens, width] per scene, float32
    labels: dict[str, torch.Tensor]  # kind -> [scenes]


def probe_set(features: Features, count: int, held_out: bool, batch: int = 16) -> ProbeSet:
    """`count` scenes with objects (train: indices 0.., held out: from VAL_START) and their labels."""
    scenes, index = [], VAL_START if held_out else 0
    while len(scenes) < count:
        scene = render_scene(index, PROBE_SEED)
        index += 1
        if scene.objects:
            scenes.append(scene)
    tokens = []
    with torch.no_grad():
        for start in range(0, count, batch):
            tokens += [t.float().cpu() for t in features(scenes[start : start + batch])]
    labels = [scene_labels(s) for s in scenes]
    return ProbeSet(tokens, {k: torch.tensor([lab[k] for lab in labels]) for k in KINDS})


class AttentionProbe(torch.nn.Module):
    """Attentive probing: one learned query per kind attends over an image's tokens through
    shared key and value projections (multi-head cross-attention, as the attentive probes of
    V-JEPA and AIM); per kind a LayerNorm, then a linear layer."""

    def __init__(self, width: int, heads: int = 4, inner: int = 128):
        super().__init__()
        self.num_heads = heads
        self.queries = torch.nn.Parameter(torch.randn(len(KINDS), inner) * inner**-0.5)
        self.key = torch.nn.Linear(width, inner)
        self.value = torch.nn.Linear(width, inner)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(inner) for _ in KINDS)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(inner, n) for n in KINDS.values())

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens [B, L, C], mask [B, L] (True on real tokens) -> logits per kind [B, classes]."""
        b, inner, h = tokens.shape[0], self.queries.shape[-1], self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:  # [..., n, inner] -> [..., heads, n, inner / heads]
            return x.unflatten(-1, (h, inner // h)).transpose(-3, -2)

        queries = split(self.queries)[None].expand(b, -1, -1, -1)
        pooled = F.scaled_dot_product_attention(
            queries, split(self.key(tokens)), split(self.value(tokens)), attn_mask=mask[:, None, None, :]
        )
        pooled = pooled.transpose(1, 2).reshape(b, len(KINDS), inner)
        return {
            kind: head(norm(pooled[:, i])) for i, (kind, norm, head) in enumerate(zip(KINDS, self.norms, self.heads))
        }


def _padded(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(f) for f in features])
    tokens = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    return tokens, torch.arange(tokens.shape[1])[None] < lengths[:, None]


def train_probe(train: ProbeSet, steps: int, batch: int = 64, lr: float = 3e-3, seed: int = 0) -> AttentionProbe:
    """The probe after `steps` Adam steps on random batches of the training scenes."""
    generator = torch.Generator().manual_seed(seed)
    width = train.features[0].shape[-1]
    # Tokens of any scale: standardised per channel with the training set's statistics.
    every = torch.cat(train.features)
    mean, std = every.mean(0), every.std(0).clamp(min=1e-6)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = AttentionProbe(width)
    probe.register_buffer("mean", mean)
    probe.register_buffer("std", std)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        chosen = torch.randint(len(train.features), (min(batch, len(train.features)),), generator=generator)
        tokens, mask = _padded([(train.features[i] - mean) / std for i in chosen.tolist()])
        logits = probe(tokens, mask)
        loss = sum(F.cross_entropy(logits[k], train.labels[k][chosen]) for k in KINDS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe


@torch.no_grad()
def score_probe(probe: AttentionProbe, held_out: ProbeSet) -> dict[str, float]:
    """Accuracy per kind on the held-out scenes, and their mean as `all`."""
    tokens, mask = _padded([(f - probe.mean) / probe.std for f in held_out.features])
    logits = probe(tokens, mask)
    scores = {k: (logits[k].argmax(-1) == held_out.labels[k]).float().mean().item() for k in KINDS}
    return {**scores, "all": sum(scores.values()) / len(scores)}


def majority_rates(train: ProbeSet, held_out: ProbeSet) -> dict[str, float]:
    """Accuracy of always answering each kind's most common training class (the prior)."""
    rates = {k: (held_out.labels[k] == train.labels[k].mode().values).float().mean().item() for k in KINDS}
    return {**rates, "all": sum(rates.values()) / len(rates)}


def encoder_features(directory: str | Path, rules: ImageConfig) -> ImageFeatures:
    """The tokens of the encoder in an encoder directory (a converted SigLIP2, or one exported by
    tools/export_encoder.py), reading images at native resolution under `rules`."""
    saved, _, _ = read_encoder_checkpoint(directory)
    encoder_cfg = {**dataclasses.asdict(saved), "init_from": str(directory)}
    cfg = config_from_dict({"model": {"encoder": encoder_cfg}, "data": {"image": dataclasses.asdict(rules)}}, "")
    with callers_random_state_kept():
        encoder = build_encoder(cfg, standalone=True)[0].eval()
    return _packed_features(encoder, rules, saved.patch_size)


def head_features(tokenizer_dir: str | Path, run: str | Path, quantizer: str = "linf") -> ImageFeatures:
    """What the ViQ head of a stage-2 `run` (e.g. 2-1: `linf`) feeds the projector, with the encoder,
    head sizes and image rules of the tokenizer in `tokenizer_dir` (the run's descendant). Reads
    the run's checkpoint through Megatron's runtime: call inside one (one process, TP=1)."""
    cfg, llm_hidden_size, _ = read_tokenizer_files(tokenizer_dir)
    cfg.model.head.quantizer = quantizer
    with callers_random_state_kept():
        visual = quantized_input(cfg, llm_hidden_size)
    loaded, expected = load_shared_weights([visual], run, "visual.")
    if loaded < expected:
        raise CheckpointError(f"{run}: holds {loaded} of the {expected} tensors of the {quantizer} visual input")
    visual.eval()
    return _packed_features(
        lambda packed: visual.head(visual.encoder(packed), packed)[0], cfg.data.image, cfg.model.encoder.patch_size
    )


def _packed_features(tokens_of, rules: ImageConfig, patch: int) -> ImageFeatures:
    """Images at native resolution under `rules`, packed, through `tokens_of(packed) -> [N, C]`."""

    def features(images: Sequence[Image.Image]) -> list[torch.Tensor]:
        packed = PackedImages.from_images([load_native_image(im, rules, patch) for im in images])
        return [t.float().cpu() for t in packed.split(tokens_of(packed))]

    return features


def pixel_features(patch: int = 16, side: int = 128) -> ImageFeatures:
    """Raw pixels as tokens (each image resized to `side`, one token per patch): the reference a
    learned representation should beat on what needs more than colour at one place."""

    def features(images: Sequence[Image.Image]) -> list[torch.Tensor]:
        out = []
        for image in images:
            pixels = torch.tensor(list(image.convert("RGB").resize((side, side)).getdata()), dtype=torch.float32)
            grid = pixels.reshape(side // patch, patch, side // patch, patch, 3).permute(0, 2, 1, 3, 4)
            out.append(grid.reshape(-1, patch * patch * 3) / 255)
        return out

    return features
