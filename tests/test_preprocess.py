"""tools/preprocess_images.py: exact read-back, bad inputs, data-parallel and resumed runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, make_image, tiny_train_config, torchrun
from PIL import Image

from viq_megatron.data.conversations import Sample, SampleError
from viq_megatron.data.text import SentencePieceTokenizer, Turn, tokenize_conversation
from viq_megatron.data.token_dataset import ANSWER, CODES, GRID, TEXT, TokenDataset
from viq_megatron.preprocess import read_inputs
from viq_megatron.runtime.errors import InputError

HEAD = "model.head={subtoken_size: 32, pre_layers: 1, subtoken_layers: 1, subtoken_ffn_size: 64, post_blocks: 1}"


@pytest.fixture(scope="module")
def tools(tmp_path_factory, megatron_world):
    from viq_megatron.tokenizer import ViQTokenizer

    folder = tmp_path_factory.mktemp("tools")
    torch.manual_seed(0)
    tok = ViQTokenizer(tiny_train_config(folder, HEAD), 64)
    tok.save(folder / "tok")
    texts = ["Describe the image.", "A red circle on grey.", "What colour is it?", "red", "Two squares."]
    SentencePieceTokenizer.train(texts * 4, 300, folder / "sp")
    return folder / "tok", folder / "sp.model", tok


def preprocess(tools, source, out, *extra, preexec_fn=None):
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/preprocess_images.py"),
            "--input",
            str(source),
            "--tokenizer",
            str(tools[0]),
            "--text-tokenizer",
            str(tools[1]),
            "--out",
            str(out),
            "--shard-size",
            "2",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec_fn,
    )


def conversation_dataset(folder):
    for i, size in enumerate([(64, 48), (32, 32), (96, 64), (48, 80)]):
        make_image(folder / f"{i}.png", size=size, seed=i)
    samples = [
        {
            "image": "0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": "A red circle on grey."},
            ],
        },
        {
            "image": ["1.png", "2.png"],
            "conversations": [
                {"from": "human", "value": "<image> and <image>: what colour is it?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "Describe the image."},
                {"from": "gpt", "value": "Two squares."},
            ],
        },
        {
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
        },
        {"conversations": [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "red"}]},
        {
            "image": [{"img_path": "3.png"}],
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "Two squares."}],
        },
    ]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path, samples


@pytest.fixture(scope="module")
def offline(tools, tmp_path_factory):
    """The conversation dataset written once as codes (codes/train) and as encoder features
    (features/train): (its folder, data file, raw samples, {"codes": run, "features": run})."""
    folder = tmp_path_factory.mktemp("offline")
    data, raw = conversation_dataset(folder)
    runs = {
        kind: preprocess(tools, data, folder / kind / "train", *extra)
        for kind, extra in (("codes", ()), ("features", ("--features",)))
    }
    return folder, data, raw, runs


def test_token_files_read_back_exactly(tools, offline):
    folder, _, raw, runs = offline
    result = runs["codes"]
    assert result.returncode == 3, result.stderr[-2000:]  # one sample skipped (missing image)
    tok, text_tok = tools[2], SentencePieceTokenizer(tools[1])
    dataset = TokenDataset(folder / "codes/train")
    kept = [raw[0], raw[1], raw[3], raw[4]]
    assert len(dataset) == len(kept)
    for sample, entry in zip((dataset[i] for i in range(len(dataset))), kept):
        images = entry.get("image", [])
        images = [
            i["img_path"] if isinstance(i, dict) else i for i in (images if isinstance(images, list) else [images])
        ]
        roles = {"human": "user", "gpt": "assistant"}
        turns = [Turn(roles[t["from"]], t["value"]) for t in entry["conversations"]]
        expected_text, expected_flags = [], []
        for piece in tokenize_conversation(text_tok, turns).pieces:
            if piece[0] == "text":
                expected_text += piece[1]
                expected_flags += piece[2]
        text = [int(v) for mode, seq in sample.segments if mode in (TEXT, ANSWER) for v in seq]
        flags = [mode == ANSWER for mode, seq in sample.segments if mode in (TEXT, ANSWER) for _ in seq]
        assert text == expected_text and flags == expected_flags
        codes = [seq for mode, seq in sample.segments if mode == CODES]
        grids = [tuple(seq) for mode, seq in sample.segments if mode == GRID]
        assert len(codes) == len(images)
        for image, stored, grid in zip(images, codes, grids):
            reference = tok.encode([folder / image])[0].codes
            assert grid == (reference.shape[0] // 2, reference.shape[1] // 2)
            assert np.array_equal(stored, reference.reshape(-1).numpy())
    report = [json.loads(l) for l in (folder / "codes/train.report.jsonl").read_text().splitlines()]
    assert len(report) == 1 and "sample 2" in report[0]["reason"] and "missing.png" in report[0]["reason"]
    assert "1 inputs skipped" in result.stdout and "bytes written for" in result.stdout


def broken_folder(folder):
    make_image(folder / "good.jpg", size=(120, 90))
    make_image(folder / "cmyk.jpg", mode="CMYK", seed=1)
    Image.fromarray(np.full((40, 60), 40000, dtype=np.uint16)).save(folder / "deep16.png")
    Image.new("RGBA", (50, 40), (255, 0, 0, 128)).save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image(folder / "rotated.jpg", size=(80, 40), seed=2, exif=exif.tobytes())
    truncated = folder / "truncated.jpg"
    make_image(truncated, size=(200, 150), seed=3)
    truncated.write_bytes(truncated.read_bytes()[:700])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    make_image(folder / "strip.png", size=(1, 5000))
    return {"truncated.jpg", "zero.png", "text.png", "strip.png"}


def test_bad_inputs_are_reported_and_a_rerun_after_a_kill_gives_the_same_files(tools, tmp_path):
    (tmp_path / "in").mkdir()
    bad = broken_folder(tmp_path / "in")
    out = tmp_path / "out/all"
    result = preprocess(tools, tmp_path / "in", out)
    assert result.returncode == 3, result.stderr[-2000:]
    report = [json.loads(l) for l in (tmp_path / "out/all.report.jsonl").read_text().splitlines()]
    assert sorted(r["input"].rsplit("/", 1)[-1] for r in report) == sorted(bad)
    assert all(r["reason"] for r in report)
    dataset = TokenDataset(out)
    assert len(dataset) == 5  # good, cmyk, 16-bit, alpha, rotated
    grids = [tuple(seq) for i in range(5) for mode, seq in dataset[i].segments if mode == GRID]
    assert (5, 2) in grids and (2, 5) not in grids  # the EXIF-rotated 80x40 photo stands upright: 32x80
    original = {suffix: (out.parent / f"all{suffix}").read_bytes() for suffix in (".bin", ".idx")}

    # A kill: the merged files and the last shard's completion marker never got written.
    shards = sorted((tmp_path / "out/all.shards").glob("*.json"))
    finished = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    shards[-1].unlink()
    for suffix in (".bin", ".idx"):
        (out.parent / f"all{suffix}").unlink()
    assert preprocess(tools, tmp_path / "in", out).returncode == 3
    for suffix, content in original.items():
        assert (out.parent / f"all{suffix}").read_bytes() == content
    assert {
        p.name: p.stat().st_mtime_ns for p in sorted((tmp_path / "out/all.shards").glob("*.json"))[:-1]
    } == finished  # finished shards were not redone


def test_data_parallel_preprocessing_equals_one_process(tools, tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(7):
        make_image(tmp_path / "in" / f"{i}.png", size=(32 + 16 * (i % 3), 48), seed=i)
    assert preprocess(tools, tmp_path / "in", tmp_path / "one/x").returncode == 0
    torchrun(
        2,
        str(ROOT / "tools/preprocess_images.py"),
        "--input",
        str(tmp_path / "in"),
        "--tokenizer",
        str(tools[0]),
        "--text-tokenizer",
        str(tools[1]),
        "--out",
        str(tmp_path / "two/x"),
        "--shard-size",
        "2",
    )
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one/x{suffix}").read_bytes() == (tmp_path / f"two/x{suffix}").read_bytes()


def test_discrete_first_step_loss_equals_online_quantized_model(tools, offline, tmp_path, megatron_world):
    """Training on pre-extracted codes sees exactly the batch and loss the online model does."""
    from viq_megatron.data.conversations import read_conversations
    from viq_megatron.data.multimodal import PackedConversationDataset, PackedTokenDataset
    from viq_megatron.models.llm import build_llm
    from viq_megatron.models.multimodal import CodeVisualInput, VisionLanguageModel

    folder, data, _, _ = offline
    cfg = tiny_train_config(tmp_path, HEAD)
    tok, text_tok = tools[2], SentencePieceTokenizer(tools[1])
    samples = [s for s in read_conversations(data) if not isinstance(s, ValueError)]
    online_data = PackedConversationDataset(
        samples, text_tok, tok.cfg.data.image, 16, seq_length=200, teacher_side=32, seed=5
    )
    offline_data = PackedTokenDataset(str(folder / "codes/train"), seq_length=200, seed=5)
    assert offline_data.lengths == online_data.lengths
    torch.manual_seed(0)
    llm = build_llm(cfg.model.llm.arch, 1, torch.float32, "local").eval()
    online = VisionLanguageModel(tok.visual, llm).eval()
    offline = VisionLanguageModel(CodeVisualInput(tok.visual.head, tok.visual.projector), llm).eval()
    for row in range(online_data.rows_per_epoch()):
        a, b = online_data[row], offline_data[row]
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
        with torch.no_grad():
            loss_online, loss_offline = online(a).token_losses, offline(b).token_losses
        assert torch.equal(loss_online, loss_offline), row


def test_pipeline_parallel_training_equals_one_process(tools, offline, tmp_path):
    """TP2 x PP2 (1F1B and interleaved) trains exactly as TP1 x PP1: discrete training on
    offline codes (visual input on the first stage), and stage 1, whose distillation loss is
    computed on the first stage and its caption loss on the last."""
    codes = offline[0] / "codes/train"
    discrete = [
        "train.stage=discrete",
        f"model.viq_tokenizer={tools[0]}",
        f"data.train={codes}",
        f"data.val={codes}",
        "data.seq_length=160",
    ]
    worker = str(ROOT / "tests/workers/pipeline_checks.py")
    torchrun(1, worker, "reference", str(tmp_path / "reference.json"), str(tmp_path), *discrete)
    torchrun(4, worker, "pipelined", str(tmp_path / "pipelined.json"), str(tmp_path), *discrete, timeout=600)
    reference = json.loads((tmp_path / "reference.json").read_text())
    pipelined = json.loads((tmp_path / "pipelined.json").read_text())
    assert len(reference["discrete"]) == 3 and reference["discrete"][0] != reference["discrete"][-1]
    for name, expected in [
        ("stage1", reference["stage1"]),
        ("discrete", reference["discrete"]),
        ("discrete_interleaved", reference["discrete"]),
    ]:
        assert pipelined[name] == pytest.approx(expected, rel=1e-4), name


def token_samples(seed: int, count: int):
    from viq_megatron.data.token_dataset import TokenSample

    rng = np.random.default_rng(seed)
    return [
        TokenSample([(TEXT, rng.integers(0, 100, 5)), (GRID, np.array([1, 2])), (CODES, rng.integers(0, 64, 8))])
        for _ in range(count)
    ]


def write_tokens(prefix, samples) -> None:
    from viq_megatron.data.token_dataset import TokenDatasetWriter

    writer = TokenDatasetWriter(prefix)
    for sample in samples:
        writer.add(sample)
    writer.finalize()


def read_tokens(prefix):
    dataset = TokenDataset(prefix)
    return [[(mode, seq.tolist()) for mode, seq in dataset[i].segments] for i in range(len(dataset))]


@pytest.mark.parametrize("killed", ["while building", "moving .bin into place", "moving .idx into place"])
def test_a_killed_merge_leaves_the_old_pair_or_none_never_a_mix(tmp_path, monkeypatch, killed):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from viq_megatron.data import token_dataset

    prefix = tmp_path / "tokens"
    write_tokens(prefix, token_samples(0, 3))
    old = read_tokens(prefix)
    real_replace, renames = token_dataset.os.replace, []

    def dies(*args, **kwargs):
        raise RuntimeError("killed")

    def dies_at_rename(src, dst):
        renames.append(dst)
        if len(renames) == {"moving .bin into place": 1, "moving .idx into place": 2}[killed]:
            raise RuntimeError("killed")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        if killed == "while building":
            patch.setattr(IndexedDatasetBuilder, "finalize", dies)
        else:
            patch.setattr(token_dataset.os, "replace", dies_at_rename)
        with pytest.raises(RuntimeError):
            write_tokens(prefix, token_samples(1, 5))
    if (tmp_path / "tokens.idx").exists():
        assert read_tokens(prefix) == old
    else:
        with pytest.raises(InputError, match="no such file"):
            TokenDataset(prefix)
    write_tokens(prefix, token_samples(1, 5))  # the rerun
    write_tokens(tmp_path / "uninterrupted", token_samples(1, 5))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"tokens{suffix}").read_bytes() == (tmp_path / f"uninterrupted{suffix}").read_bytes()


def test_a_mismatched_bin_and_idx_is_one_line_naming_the_file(tmp_path):
    write_tokens(tmp_path / "a", token_samples(0, 3))
    write_tokens(tmp_path / "b", token_samples(1, 5))
    (tmp_path / "a.idx").write_bytes((tmp_path / "b.idx").read_bytes())
    with pytest.raises(ValueError) as mismatch:
        TokenDataset(tmp_path / "a")
    assert str(tmp_path / "a.bin") in str(mismatch.value) and "\n" not in str(mismatch.value)


def test_a_rerun_from_other_inputs_stops_instead_of_mixing_shards(tools, tmp_path):
    data, raw = conversation_dataset(tmp_path)
    out = tmp_path / "out/train"
    assert preprocess(tools, data, out).returncode == 3
    fresh = {suffix: Path(f"{out}{suffix}").read_bytes() for suffix in (".bin", ".idx")}
    raw[0]["conversations"][1]["value"] = "A blue circle on grey."  # a caption changed
    data.write_text("".join(json.dumps(s) + "\n" for s in raw))
    for extra, says in (((), "the inputs"), (("--shard-size", "3"), "--shard-size was 2")):
        changed = preprocess(tools, data, out, *extra)
        assert changed.returncode == 2 and says in changed.stderr and "--overwrite" in changed.stderr, changed.stderr
        assert changed.stderr.count("\n") == 1
        assert {s: Path(f"{out}{s}").read_bytes() for s in (".bin", ".idx")} == fresh  # untouched
    assert preprocess(tools, data, out, "--overwrite").returncode == 3
    assert preprocess(tools, data, tmp_path / "clean/train").returncode == 3
    for suffix in (".bin", ".idx"):
        assert Path(f"{out}{suffix}").read_bytes() == (tmp_path / f"clean/train{suffix}").read_bytes()
    assert Path(f"{out}.bin").read_bytes() != fresh[".bin"]
    bad = preprocess(tools, data, out, "--shard-size", "0")
    assert bad.returncode == 2 and "--shard-size" in bad.stderr


def test_an_unreadable_input_file_is_one_line_naming_it(tmp_path):
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"conversations": [{"from": "gpt", "value": "caf\xe9"}]}\n'.encode("latin-1"))
    cut = tmp_path / "cut.json"
    cut.write_text('[{"image": "a.png", "conversations": [')
    for path, says in (
        (nested, "JSON nested too deeply to read"),
        (latin1, "not UTF-8 text (byte 0xe9"),
        (cut, "invalid JSON"),
        (tmp_path / "missing.json", "cannot read data"),
    ):
        with pytest.raises(InputError) as e:
            read_inputs(path, None, False)
        assert str(e.value).startswith(f"{path}: {says}") and "\n" not in str(e.value), e.value


def test_folder_links_out_of_it_and_dangling_links_are_reported(tmp_path):
    folder, outside = tmp_path / "in", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    make_image(folder / "good.png")
    make_image(outside / "secret.png", seed=1)
    make_image(folder / "inside.png", seed=2)
    (folder / "out.png").symlink_to(outside / "secret.png")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "alias.png").symlink_to(folder / "inside.png")  # stays in the folder: read
    (folder / "bad_caption.png").symlink_to(folder / "good.png")
    (folder / "bad_caption.txt").write_bytes(b"\xff\xfe")
    items = read_inputs(folder, None, False)
    assert {Path(i.source).name for i in items if isinstance(i, Sample)} == {"alias.png", "good.png", "inside.png"}
    errors = {Path(str(e).split(": ")[0]).name: str(e) for e in items if isinstance(e, SampleError)}
    assert "symbolic link out of" in errors["out.png"] and "dangling symbolic link" in errors["dangling.png"]
    assert "not UTF-8 text" in errors["bad_caption.txt"] and len(errors) == 3
    allowed = read_inputs(folder, None, True)
    assert "out.png" in {Path(i.source).name for i in allowed if isinstance(i, Sample)}


def test_an_unwritable_output_or_a_full_disk_is_one_line_and_a_rerun_resumes(tools, tmp_path):
    import resource
    import signal

    data, _ = conversation_dataset(tmp_path)
    (tmp_path / "file").write_text("")
    blocked = preprocess(tools, data, tmp_path / "file/train")
    assert (
        blocked.returncode == 2
        and blocked.stderr
        == f"error: {tmp_path / 'file/train'}: cannot write there ({tmp_path / 'file'}: not a folder)\n"
    ), blocked.stderr

    def small_disk():  # writes past 600 bytes fail as on a full disk (EFBIG rather than ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, resource.RLIM_INFINITY))

    out = tmp_path / "out/train"
    full = preprocess(tools, data, out, preexec_fn=small_disk)
    last = full.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert full.returncode == 1 and last.startswith(f"error: {out}.shards/shard_") and "File too large" in last, (
        full.stderr[-2000:]
    )
    assert preprocess(tools, data, out).returncode == 3  # the same job, with room
    assert preprocess(tools, data, tmp_path / "clean/train").returncode == 3
    for suffix in (".bin", ".idx"):
        assert Path(f"{out}{suffix}").read_bytes() == (tmp_path / f"clean/train{suffix}").read_bytes()


def test_cached_features_are_the_encoders_tokens_and_give_its_loss(tools, offline, tmp_path, megatron_world):
    """--features stores the tokenizer encoder's tokens in bf16: the cached rows are the online rows,
    and the cached model's loss is the continuous model's with the encoder's output rounded to bf16."""
    from viq_megatron.data.conversations import read_conversations
    from viq_megatron.data.multimodal import PackedConversationDataset, PackedTokenDataset
    from viq_megatron.models.llm import build_llm
    from viq_megatron.models.multimodal import CachedFeatureVisualInput, EncoderVisualInput, VisionLanguageModel

    folder, data, _, runs = offline
    result = runs["features"]
    assert result.returncode == 3, result.stderr[-2000:]  # one missing image
    tok, text_tok = tools[2], SentencePieceTokenizer(tools[1])
    width = tok.cfg.model.encoder.hidden_size
    assert f"{2 * width:,} bytes per patch" in result.stdout
    samples = [s for s in read_conversations(data) if not isinstance(s, ValueError)]
    online_data = PackedConversationDataset(
        samples, text_tok, tok.cfg.data.image, 16, seq_length=200, teacher_side=None, seed=5
    )
    cached_data = PackedTokenDataset(str(folder / "features/train"), seq_length=200, seed=5, feature_width=width)
    assert cached_data.lengths == online_data.lengths
    torch.manual_seed(0)
    cfg = tiny_train_config(tmp_path, HEAD)
    llm = build_llm(cfg.model.llm.arch, 1, torch.float32, "local").eval()
    online = VisionLanguageModel(EncoderVisualInput(tok.visual.encoder, tok.visual.projector), llm).eval()
    cached = VisionLanguageModel(CachedFeatureVisualInput(tok.visual.projector, llm.config), llm).eval()
    rounding = tok.visual.encoder.register_forward_hook(lambda module, args, out: out.bfloat16().float())
    try:
        for row in range(online_data.rows_per_epoch()):
            a, b = online_data[row], cached_data[row]
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
            assert b.features.dtype == torch.bfloat16
            with torch.no_grad():
                assert torch.equal(b.features.float(), tok.visual.encoder(a.images))
                assert torch.equal(online(a).token_losses, cached(b).token_losses), row
    finally:
        rounding.remove()

    # Codes and features are not mixed up: each stage refuses the other's files, and a rerun stops.
    with pytest.raises(InputError, match="features/train: holds encoder features"):
        PackedTokenDataset(str(folder / "features/train"), seq_length=200, seed=5)
    with pytest.raises(InputError, match="codes/train: holds ViQ codes"):
        PackedTokenDataset(str(folder / "codes/train"), seq_length=200, seed=5, feature_width=width)
    rerun = preprocess(tools, data, folder / "features/train")
    assert rerun.returncode == 2 and "encoder features, not codes" in rerun.stderr


def test_a_cached_run_reads_images_online_through_the_tokenizers_encoder(tools, offline, tmp_path, megatron_world):
    """Evaluation of a cached run from images: the tokenizer's encoder, then the run's projector;
    with the encoder's output rounded to bf16 it embeds exactly what the run trained on."""
    from viq_megatron.data.conversations import read_conversations
    from viq_megatron.data.multimodal import PackedConversationDataset, PackedTokenDataset
    from viq_megatron.models.multimodal import CachedFeatureVisualInput, EncoderVisualInput
    from viq_megatron.training.stages import STAGES

    folder, data, _, _ = offline
    tok = tools[2]
    cfg = tiny_train_config(tmp_path, HEAD, "train.stage=cached", f"model.viq_tokenizer={tools[0]}")
    model = STAGES["cached"](cfg).chunks[0].eval()
    cached = model.visual
    assert isinstance(cached, CachedFeatureVisualInput)
    with torch.no_grad():  # as if trained: the run's projector is no longer the tokenizer's
        for p in cached.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model, _, _ = STAGES["cached"].inference_model(cfg, online=True)
    assert isinstance(model.visual, EncoderVisualInput)
    model.visual.projector.load_state_dict(cached.projector.state_dict())  # what the run's checkpoint holds
    samples = [s for s in read_conversations(data) if not isinstance(s, ValueError)]
    online_data = PackedConversationDataset(
        samples, SentencePieceTokenizer(tools[1]), tok.cfg.data.image, 16, seq_length=200, teacher_side=None, seed=5
    )
    cached_data = PackedTokenDataset(
        str(folder / "features/train"), seq_length=200, seed=5, feature_width=tok.cfg.model.encoder.hidden_size
    )
    rounding = model.visual.encoder.register_forward_hook(lambda module, args, out: out.bfloat16().float())
    with torch.no_grad():
        for row in range(online_data.rows_per_epoch()):
            online, stored = model.visual(online_data[row]).embeddings, cached(cached_data[row]).embeddings
            assert torch.equal(online, stored), row
    rounding.remove()
