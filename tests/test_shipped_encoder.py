"""The shipped starting encoder (pretrained/tiny_scene_encoder) against its card, and the
pretraining and export that made it: a short rerun of the card's command learns, the export holds
the run's encoder, and stage 1 starts from the exported file and uses it as its teacher."""

import hashlib
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, torchrun
from safetensors.torch import load_file

SHIPPED = ROOT / "pretrained" / "tiny_scene_encoder"
CONFIG = ROOT / "examples" / "encoder_pretrain_tiny_cpu.yaml"
SHORT = [
    "data.embedded.train_scenes=48",
    "data.embedded.val_scenes=4",
    "data.seq_length=1024",
    "data.num_workers=0",
    "train.steps=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.save_every=8",
    "train.optimizer.warmup_steps=1",
]


def card_table(heading: str) -> dict[str, dict[str, float]]:
    """The markdown table under `heading` in the card: row name -> {column: value}."""
    text = (SHIPPED / "README.md").read_text()
    section = text[text.index(heading) :]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header) or not re.fullmatch(r"[\d.]+", cells[1]):
            break
        rows[cells[0]] = {k: float(v) for k, v in zip(header[1:], cells[1:])}
    return rows


def test_shipped_weights_are_the_ones_the_card_describes():
    card = (SHIPPED / "README.md").read_text()
    digest = hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest()
    assert f"`{digest}`" in card, "model.safetensors differs from the card's sha256"
    saved = json.loads((SHIPPED / "encoder.json").read_text())
    from viq_megatron.config import load_config

    encoder = load_config(CONFIG).model.encoder
    assert {k: v for k, v in saved.items() if k != "pooling_head"} == {
        k: getattr(encoder, k) for k in saved if k != "pooling_head"
    }, "the shipped encoder's sizes are not the pretraining config's"


def test_shipped_encoder_reproduces_the_cards_probe_accuracy():
    """The card's test-protocol row, measured again here (small: 300 training scenes, 100 held out)."""
    from viq_megatron.benchmarks.encoder_probe import (
        KINDS,
        encoder_features,
        of_images,
        probe_set,
        score_probe,
        train_probe,
    )
    from viq_megatron.config import ImageConfig

    expected = card_table("## Test protocol")["tiny_scene_encoder tokens"]
    features = of_images(encoder_features(SHIPPED, ImageConfig(min_pixels=4096, max_pixels=16384)))
    scores = score_probe(train_probe(probe_set(features, 300, held_out=False), 300), probe_set(features, 100, True))
    for kind in KINDS:
        assert scores[kind] == pytest.approx(expected[kind], abs=0.05), (kind, scores, expected)


@pytest.fixture(scope="module")
def short_pretraining(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    torchrun(1, "-m", "viq_megatron.train", "--config", str(CONFIG), f"train.output_dir={out / 'run'}", *SHORT)
    return out


def test_a_short_rerun_of_the_pretraining_lowers_its_loss(short_pretraining):
    rows = [json.loads(line) for line in (short_pretraining / "run/metrics.jsonl").read_text().splitlines()]
    losses = [r["caption"] for r in rows if r["split"] == "train"]
    assert len(losses) == 8
    assert losses[0] > 5.0  # a random start: about log(vocabulary)
    assert losses[-1] < losses[0] - 1.0, losses


def test_export_holds_the_runs_encoder_and_stage1_starts_from_it(short_pretraining, megatron_world):
    """The exported file holds the run's encoder tensors (read back through the run's own model),
    and a stage-1 model built with model.encoder.init_from on it has them in its encoder and in
    its frozen teacher."""
    from viq_megatron.config import load_config
    from viq_megatron.training.checkpoint import load_shared_weights
    from viq_megatron.training.stages import STAGES

    exported = short_pretraining / "encoder"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/export_encoder.py"),
            "--config",
            str(CONFIG),
            "--checkpoint",
            str(short_pretraining / "run"),
            "--out",
            str(exported),
            "--dtype",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        re.search(r"sha256 ([0-9a-f]{64})", done.stdout)[1]
        == hashlib.sha256((exported / "model.safetensors").read_bytes()).hexdigest()
    )
    weights = load_file(str(exported / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in weights.values())

    overrides = [f"train.output_dir={short_pretraining / 'x'}", *SHORT]
    run_model = STAGES["encoder_pretrain"](load_config(CONFIG, overrides)).chunks[0]
    load_shared_weights([run_model], short_pretraining / "run")
    expected = {k: v for k, v in run_model.visual.encoder.state_dict().items() if torch.is_tensor(v)}
    assert sorted(weights) == sorted(f"encoder.{k}" for k in expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[f"encoder.{name}"], tensor.to(torch.bfloat16)), name

    stage1 = STAGES["stage1"](
        load_config(CONFIG, [*overrides, "train.stage=stage1", f"model.encoder.init_from={exported}"])
    )
    for part in (stage1.visual.encoder, stage1.visual.teacher):
        for name, tensor in part.state_dict().items():
            if torch.is_tensor(tensor):
                assert torch.equal(tensor, weights[f"encoder.{name}"].float()), name
    assert stage1.visual.pooling is None  # no pooling head: stage 1 distils mean-pooled tokens
