"""The encoder probe (viq_megatron/benchmarks/encoder_probe.py): labels read off the scene, a probe
that reads what the tokens carry and nothing that they do not."""

import torch
from PIL import Image

from viq_megatron.benchmarks.encoder_probe import (
    KINDS,
    PROBE_SEED,
    majority_rates,
    pixel_features,
    probe_set,
    scene_labels,
    scene_parameter_features,
    score_probe,
    train_probe,
)
from viq_megatron.data.scenes import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, render_scene


def test_labels_are_the_scenes_own_answers():
    for index in range(40):
        scene = render_scene(index, PROBE_SEED)
        if not scene.objects:
            continue
        labels = scene_labels(scene)
        answers = {q.kind: q.answer for q in scene.questions}
        assert BACKGROUND_COLOURS[labels["background"]] in answers["background"]
        assert labels["count"] == len(scene.objects)
        largest = max(scene.objects, key=lambda o: (o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]))
        assert (OBJECT_COLOURS[labels["colour"]], SHAPES[labels["shape"]]) == (largest.colour, largest.shape)
        width, height = scene.image.size
        x, y = (largest.bbox[0] + largest.bbox[2]) / 2, (largest.bbox[1] + largest.bbox[3]) / 2
        column = 0 if x < width / 3 else 1 if x < 2 * width / 3 else 2
        row = 0 if y < height / 3 else 1 if y < 2 * height / 3 else 2
        assert labels["position"] == 3 * row + column, (index, largest.bbox, scene.image.size)


def test_the_probe_reads_what_the_tokens_carry_and_no_more():
    """Tokens that carry each label (one-hot, in one token among noise tokens, at a random place)
    are read to near 1 on held-out scenes; all-zero tokens give exactly the prior."""
    labels_only = lambda images: [torch.zeros(1, 1) for _ in images]  # noqa: E731
    train, held_out = probe_set(labels_only, 300, held_out=False), probe_set(labels_only, 100, held_out=True)
    generator = torch.Generator().manual_seed(0)

    def carrying(labels: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        width, out = sum(KINDS.values()) + 8, []
        for i in range(len(labels["count"])):
            tokens = torch.randn(int(torch.randint(4, 12, (1,), generator=generator)), width, generator=generator)
            answer, offset = torch.zeros(width), 0
            for kind, classes in KINDS.items():
                answer[offset + int(labels[kind][i])] = 4.0
                offset += classes
            place = int(torch.randint(len(tokens), (1,), generator=generator))
            out.append(torch.cat([tokens[:place], answer[None], tokens[place:]]))
        return out

    readable = score_probe(
        train_probe(type(train)(carrying(train.labels), train.labels), steps=300),
        type(held_out)(carrying(held_out.labels), held_out.labels),
    )
    assert min(readable.values()) >= 0.95, readable
    zeros = lambda data: type(data)([torch.zeros(5, 8) for _ in data.features], data.labels)  # noqa: E731
    blind = score_probe(train_probe(zeros(train), steps=100), zeros(held_out))
    for kind in KINDS:  # without information a probe answers one class: at best the commonest one
        assert blind[kind] <= commonest_rate(held_out, kind) + 1e-6, (kind, blind[kind])
        assert majority_rates(train, held_out)[kind] <= commonest_rate(held_out, kind) + 1e-6


def commonest_rate(data, kind: str) -> float:
    return torch.bincount(data.labels[kind]).max().item() / len(data.labels[kind])


def test_pixel_tokens_give_a_reference_row():
    """Raw pixels at 64x64: one token per 16x16 patch of 16*16*3 values in [0, 1]."""
    tokens = pixel_features(patch=16, side=64)([Image.new("RGB", (100, 50), (255, 0, 0))])
    assert tokens[0].shape == (16, 768)
    assert torch.equal(tokens[0][:, 0::3], torch.ones(16, 256)) and tokens[0][:, 1::3].abs().sum() == 0


def test_the_probe_reads_the_scene_parameters():
    """The ceiling row: each scene's exact parameters as tokens (the bench's oracle) are read well
    above the prior for every kind but the position (a 3x3 cell from box corners, which one
    attention readout learns slowly: docs/results.md)."""
    train = probe_set(scene_parameter_features, 300, held_out=False)
    held_out = probe_set(scene_parameter_features, 100, held_out=True)
    scores, prior = score_probe(train_probe(train, steps=300), held_out), majority_rates(train, held_out)
    for kind in ("background", "count", "colour", "shape"):
        assert scores[kind] >= 0.75 and scores[kind] >= prior[kind] + 0.3, (kind, scores, prior)
