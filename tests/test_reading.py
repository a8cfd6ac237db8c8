"""Does the LLM read the image? One sample traced through every step of the path (placeholder
expansion, where the visual embeddings land, positions and the answer-only loss, packing and
shuffling, gradients and freezing), then models trained on answers that only the image holds,
against blind controls, and tools/bench_quality.py's numbers recomputed from its answer files."""

import json
from collections import Counter, defaultdict

import pytest
import torch
from conftest import ROOT, torchrun
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 70, 220), "yellow": (250, 220, 30)}


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    from viq_megatron.data.text import SentencePieceTokenizer

    folder = tmp_path_factory.mktemp("sp")
    return SentencePieceTokenizer.train(
        ["What colour is it?", "Describe.", "A scene.", *COLOURS] * 4, 300, folder / "sp"
    )


def colour_sample(folder, name: str, colour: str, size=(48, 32)):
    from viq_megatron.data.conversations import Sample
    from viq_megatron.data.text import Turn

    path = folder / f"{name}.png"
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return Sample(name, (Turn("user", "Describe.\n<image>\nWhat colour is it?"), Turn("assistant", colour)), (path,))


RULES = dict(min_pixels=256, max_pixels=4096)


def test_placeholder_becomes_one_slot_per_patch_where_it_stood(tmp_path, text_tokenizer):
    from viq_megatron.config import ImageConfig
    from viq_megatron.data.multimodal import encode_sample
    from viq_megatron.data.text import tokenize_conversation

    sample = colour_sample(tmp_path, "a", "red", size=(48, 32))  # 3 x 2 patches
    encoded = encode_sample(sample, text_tokenizer, ImageConfig(**RULES), 16, None)
    pieces = tokenize_conversation(text_tokenizer, sample.turns).pieces
    before = pieces[0][1]  # the template and "Describe.\n" before the placeholder
    assert [p[0] for p in pieces] == ["text", "image", "text"]
    assert encoded.visual_slots == list(range(len(before), len(before) + 6))
    assert encoded.token_ids[: len(before)] == before and encoded.token_ids[len(before) + 6 :] == pieces[2][1]
    assert not any(encoded.loss_flags[: len(before) + 6])
    answer = [t for t, flag in zip(encoded.token_ids, encoded.loss_flags) if flag]
    assert answer[-1] == text_tokenizer.eos_id and text_tokenizer.decode(answer[:-1]).strip() == "red"


def test_packing_keeps_positions_labels_and_the_loss_inside_each_sample(tmp_path, text_tokenizer):
    from viq_megatron.config import ImageConfig
    from viq_megatron.data.multimodal import encode_sample, pack_samples

    encoded = [
        encode_sample(colour_sample(tmp_path, str(k), c, size), text_tokenizer, ImageConfig(**RULES), 16, None)
        for k, (c, size) in enumerate([("red", (48, 32)), ("blue", (64, 64)), ("green", (32, 16))])
    ]
    batch = pack_samples(encoded)
    starts = [0]
    for sample in encoded:
        starts.append(starts[-1] + len(sample))
    assert batch.cu_seqlens.tolist() == starts
    for sample, start in zip(encoded, starts):
        n = len(sample)
        assert batch.position_ids[start : start + n].tolist() == list(range(n))
        assert batch.labels[start : start + n - 1].tolist() == sample.token_ids[1:]  # the next token ...
        assert batch.loss_mask[start + n - 1] == 0  # ... never the next sample's first
        # The loss at position i is on token i + 1: exactly the answer's tokens (and its EOS).
        assert batch.loss_mask[start : start + n - 1].tolist() == [float(f) for f in sample.loss_flags[1:]]
    assert batch.visual_positions.tolist() == [s + p for sample, s in zip(encoded, starts) for p in sample.visual_slots]
    assert batch.images.cu_seqlens.tolist() == [0, 6, 22, 24]  # images in sample order, one slot per patch


def test_shuffled_packed_rows_pair_each_question_with_its_own_image(tmp_path, text_tokenizer):
    """Every row of a shuffled dataset: each sample's slots are filled by its own image (its colour
    is the answer its loss is taken on)."""
    from viq_megatron.config import ImageConfig
    from viq_megatron.data.multimodal import PackedConversationDataset

    colours = sorted(COLOURS)
    samples = [
        colour_sample(tmp_path, f"s{k}", colours[k % 4], size=(16 * (1 + k % 3), 16 * (1 + k % 2))) for k in range(30)
    ]
    rules = ImageConfig(**RULES, mean=[0.0] * 3, std=[1.0] * 3)
    data = PackedConversationDataset(samples, text_tokenizer, rules, 16, seq_length=160, teacher_side=None, seed=3)
    seen = 0
    for row in range(data.rows_per_epoch()):
        batch = data[row]
        images = batch.images.split(batch.images.patches)
        bounds = batch.cu_seqlens.tolist()
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            answer = [int(t) for t, m in zip(batch.labels[a:b], batch.loss_mask[a:b]) if m]
            colour = text_tokenizer.decode(answer[:-1]).strip()
            rgb = images[k].reshape(-1, 3).mean(0) * 255
            assert torch.allclose(rgb, torch.tensor(COLOURS[colour], dtype=torch.float32), atol=1), (row, k, colour)
            seen += 1
    assert seen == len(samples)


@pytest.fixture(scope="module")
def tiny_model(megatron_world):
    from conftest import tiny_config

    from viq_megatron.config import LLMArch
    from viq_megatron.models.llm import build_llm
    from viq_megatron.models.multimodal import EncoderVisualInput, Projector, VisionLanguageModel
    from viq_megatron.models.vit import NativeResolutionViT, encoder_transformer_config

    torch.manual_seed(0)
    cfg = tiny_config()
    encoder = NativeResolutionViT(
        cfg.model.encoder, encoder_transformer_config(cfg.model.encoder, 1, torch.float32, "local"), "local"
    )
    arch = LLMArch(
        hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128, vocab_size=512
    )
    llm = build_llm(arch, 1, torch.float32, "local")
    return VisionLanguageModel(
        EncoderVisualInput(encoder, Projector(cfg.model.encoder.hidden_size, 64, torch.float32)), llm
    )


def test_visual_embeddings_fill_exactly_the_slots(tmp_path, text_tokenizer, tiny_model):
    """The LLM's first layer sees the visual input's output at the slots and the token embeddings
    everywhere else, row for row."""
    from viq_megatron.config import ImageConfig
    from viq_megatron.data.multimodal import encode_sample, pack_samples

    encoded = [
        encode_sample(colour_sample(tmp_path, str(k), c, size), text_tokenizer, ImageConfig(**RULES), 16, None)
        for k, (c, size) in enumerate([("red", (48, 32)), ("blue", (32, 64))])
    ]
    batch = pack_samples(encoded)
    seen = {}

    def record(module, args, kwargs):
        seen["input"] = kwargs["hidden_states"].detach().clone()

    hook = tiny_model.llm.decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            tiny_model(batch)
            visual = tiny_model.visual(batch).embeddings
            tokens = tiny_model.llm.embedding(input_ids=batch.tokens[None], position_ids=batch.position_ids[None])
    finally:
        hook.remove()
    hidden = seen["input"][:, 0]
    slots = batch.visual_positions
    others = torch.ones(len(hidden), dtype=torch.bool)
    others[slots] = False
    assert torch.equal(hidden[slots], visual) and torch.equal(hidden[others], tokens[others, 0])


def test_gradient_reaches_projector_and_encoder_not_frozen_parts(tmp_path, text_tokenizer, tiny_model):
    from viq_megatron.config import ImageConfig
    from viq_megatron.data.multimodal import encode_sample, pack_samples

    batch = pack_samples(
        [encode_sample(colour_sample(tmp_path, "g", "green"), text_tokenizer, ImageConfig(**RULES), 16, None)]
    )
    tiny_model.llm.requires_grad_(False)
    tiny_model.zero_grad()
    try:
        (tiny_model(batch).token_losses * batch.loss_mask).sum().backward()
    finally:
        tiny_model.llm.requires_grad_(True)
    visual = tiny_model.visual
    for name, module in (("projector", visual.projector), ("encoder", visual.encoder)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert all(p.grad is None for p in tiny_model.llm.parameters())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("reading")
    torchrun(2, str(ROOT / "tests/workers/reading_checks.py"), "all", str(work / "result.json"), str(work), timeout=600)
    return work, json.loads((work / "result.json").read_text())


def test_trained_models_read_the_image_and_beat_blind_controls(trained):
    """Trained through the Trainer (2 data-parallel ranks) on answers only the image holds: the
    continuous model (encoder frozen) and the discrete one (offline codes) answer held-out images
    far better than with the same images blanked or shuffled across questions (chance 0.25)."""
    _, result = trained
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("answers")}))
    assert result["frozen_encoder_unchanged"] and result["projector_trained"]
    for path in ("continuous", "discrete"):
        real, blind = result[f"{path}_real"], max(result[f"{path}_blank"], result[f"{path}_shuffled"])
        assert real >= 0.9 and real - blind >= 0.5, (path, real, blind)


def test_offline_codes_answer_exactly_as_the_online_tokenizer(trained):
    _, result = trained
    assert len(result["offline_answers"]) == 24 and result["offline_answers"] == result["online_answers"]


def test_bench_numbers_are_recomputed_from_its_answer_files(trained):
    """tools/bench_quality.py at toy size: each row's accuracy (overall and per question kind) is
    the exact-match rate of its answer file; chance and prior follow from the training answers."""
    from viq_megatron.evaluate import normalize

    work, _ = trained
    bench = work / "bench"
    report = json.loads((bench / "bench_quality.json").read_text())
    references = [json.loads(line) for line in (bench / "data/real.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in references]
    assert report["questions"] == len(references) > 10
    for row in ("oracle", "continuous", "discrete"):
        for split in ("real", "blank", "shuffled"):
            answers = [json.loads(line) for line in (bench / f"answers_{row}_{split}.jsonl").read_text().splitlines()]
            assert [a["kind"] for a in answers] == kinds
            right = [
                normalize(a["answer"]) == normalize(r["conversations"][1]["value"]) for a, r in zip(answers, references)
            ]
            assert report["rows"][row][split]["all"] == pytest.approx(sum(right) / len(right))
            by_kind = defaultdict(list)
            for kind, ok in zip(kinds, right):
                by_kind[kind].append(ok)
            assert report["rows"][row][split]["by_kind"] == pytest.approx(
                {k: sum(v) / len(v) for k, v in by_kind.items()}
            )
        assert [step for step, _ in report["rows"][row]["curve"]] == [2, 4]
    assert report["rows"]["discrete"]["online_equals_offline"] is True
    train_answers = json.loads((bench / "data/train_answers.json").read_text())
    chance = sum(1 / len(set(train_answers[k])) for k in kinds) / len(kinds)
    prior = sum(
        Counter(train_answers[k]).most_common(1)[0][0] == r["conversations"][1]["value"]
        for k, r in zip(kinds, references)
    ) / len(kinds)
    assert report["rows"]["chance"]["all"] == pytest.approx(chance)
    assert report["rows"]["prior"]["all"] == pytest.approx(prior)
    assert (bench / "bench_quality.md").read_text().count("\n") == 2 + 2 + 3 * 3


def test_oracle_tokens_hold_each_scenes_parameters():
    """Read back field by field, the oracle's tokens give the background, every object's colour,
    shape and box, and the text (a word, or a number digit by digit), in the scene's own terms."""
    from viq_megatron.benchmarks.quality import SceneOracle
    from viq_megatron.data.scenes import COLOURS, SHAPES, WORDS, render_scene

    blocks = {"type": 5, "colour": len(COLOURS), "shape": len(SHAPES), "word": len(WORDS), "digit": 10, "box": 5}
    oracle = SceneOracle(seed=3, width=64)
    for index in range(40):
        scene = render_scene(index, 3)
        (tokens,) = oracle.encoder_features([f"/any/images/scene_{index}.png"])
        assert tokens.shape[0] == 1 and tokens.shape[2] == 64
        fields, offset = {}, 0
        for name, size in blocks.items():
            fields[name] = tokens[0, :, offset : offset + size]
            offset += size
        assert not tokens[0, :, offset:].any()  # zero padding
        types = fields["type"].argmax(-1).tolist()
        w, h = scene.image.size
        assert types[0] == 0 and fields["colour"][0].tolist() == [
            1.0 if c == scene.background[0] else 0.5 if c in scene.background[1:] else 0.0 for c in COLOURS
        ]
        objects = [k for k, t in enumerate(types) if t == 1]
        assert len(objects) == len(scene.objects)
        for k, o in zip(objects, scene.objects):
            assert list(COLOURS)[fields["colour"][k].argmax()] == o.colour
            assert SHAPES[fields["shape"][k].argmax()] == o.shape
            box = fields["box"][k][:4] * torch.tensor([w, h, w, h])
            assert torch.allclose(box, torch.tensor(o.bbox, dtype=torch.float32), atol=1e-3)
        text = [k for k, t in enumerate(types) if t == 2]
        digits = "".join(str(fields["digit"][k].argmax().item()) for k, t in enumerate(types) if t == 3)
        if scene.text is None:
            assert not text and not digits
        else:
            assert list(COLOURS)[fields["colour"][text[0]].argmax()] == scene.text.colour
            read = WORDS[fields["word"][text[0]].argmax()] if scene.text.kind == "word" else digits
            assert read == scene.text.text
    (blank,) = oracle.encoder_features(["blank_7.png"])
    assert blank.shape == (1, 1, 64) and blank[0, 0, 4] == 1.0  # one token of type blank
    with pytest.raises(Exception, match=r"photo\.jpg: not a bench image"):
        oracle.encoder_features(["photo.jpg"])
