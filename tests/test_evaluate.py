"""viq_megatron.evaluate and the Hugging Face export (tools/export_hf.py, viq_megatron/hf_adapter.py).

A worker trains the tiny model (stage `continuous`, all of it trainable, ~20 s) on the
embedded scenes' question/answer pairs and answers questions with it; the tests read its
answer files. Chance for a question is 1 / the number of distinct answers its type has
(count, colour, shape, yes/no, ...), averaged over the questions.
"""

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import make_image, torchrun

WORKER = "tests/workers/evaluate_checks.py"

# Question types of the embedded scenes, by a phrase of the question (first match wins).
TYPES = (
    ("background", "background"),
    ("how many shapes", "count_all"),
    ("any text", "has_text"),
    ("how many", "count_shape"),
    ("colour is the word", "text_colour"),
    ("colour is the number", "text_colour"),
    ("what colour", "colour"),
    ("what shape", "shape"),
    ("left or right", "left_right"),
    ("above or below", "above_below"),
)


def question_type(question: str) -> str:
    return next(name for phrase, name in TYPES if phrase in question.lower())


def read_answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("evaluate")
    torchrun(1, WORKER, "train", str(work / "train.json"), str(work))
    return work, json.loads((work / "train.json").read_text())


def scores(answers: list[dict], answer_sets: dict) -> dict:
    from viq_megatron.evaluate import normalize

    n = len(answers)
    majority = {t: Counter(a).most_common(1)[0][0] for t, a in answer_sets.items()}
    return {
        "accuracy": sum(normalize(r["answer"]) == normalize(r["reference"]) for r in answers) / n,
        "chance": sum(1 / len(set(answer_sets[question_type(r["question"])])) for r in answers) / n,
        "majority": sum(majority[question_type(r["question"])] == r["reference"] for r in answers) / n,
    }


def test_trained_model_beats_chance_on_the_embedded_questions(trained):
    """The embedded dataset's question/answer pairs (of the scenes the model trained on; reading
    a word left out). The tiny model learns each question type's answers, which beats chance;
    it is not asked to beat the answer prior, nor to generalise to new scenes (only reported)."""
    work, result = trained
    seen, held_out = read_answers(work / "answers_train.jsonl"), read_answers(work / "answers.jsonl")
    answer_sets = defaultdict(list)
    for r in seen:
        answer_sets[question_type(r["question"])].append(r["reference"])
    questions = [json.loads(line) for line in (work / "data/qa_train_questions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in seen] == [q["id"] for q in questions]  # every question, in input order
    seen_scores, held_out_scores = scores(seen, answer_sets), scores(held_out, answer_sets)
    print(
        f"\nseen scenes ({len(seen)} questions): {seen_scores}\nheld-out scenes ({len(held_out)} questions): "
        f"{held_out_scores}\ntimings: {result['timings']}"
    )
    assert seen_scores["accuracy"] > seen_scores["chance"] + 0.05


def test_batched_decoding_equals_one_at_a_time(trained):
    work, _ = trained
    batched, single = read_answers(work / "answers.jsonl"), read_answers(work / "answers_single.jsonl")
    assert len(batched) > 20 and batched == single


def test_hugging_face_export_answers_like_evaluate(trained):
    """The exported Llama directory + adapter: the same greedy answers, logits after the prompt
    within 1e-4, and HF's teacher-forced argmax over our answers' tokens reproduces them."""
    work, result = trained
    assert result["hf_answers"] == [r["answer"] for r in read_answers(work / "answers.jsonl")]
    assert result["hf_logit_diff"] < 1e-4
    assert all(result["hf_teacher_forced"])
    exported = work / "hf"
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for name in (
        "model.safetensors",
        "viq_visual/config.json",
        "viq_visual/model.safetensors",
        "viq_visual/tokenizer.model",
    ):
        assert (exported / name).is_file(), name


def test_tensor_and_data_parallel_answers_equal_single_process(trained):
    """TP=2 (logits gathered over the tensor-parallel pair) and DP=2 (questions split, rank 0
    merges them in input order), under torchrun: the same file as one process writes."""
    work, _ = trained
    torchrun(2, WORKER, "parallel", str(work / "parallel.json"), str(work))
    expected = (work / "answers.jsonl").read_text()
    assert (work / "answers_tp2.jsonl").read_text() == expected
    assert (work / "answers_dp2.jsonl").read_text() == expected


def test_malformed_question_file_is_a_one_line_error(tmp_path, capsys):
    from viq_megatron import evaluate

    make_image(tmp_path / "a.png")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
    for line, problem in (
        ("{not json", "invalid JSON"),
        (json.dumps({**good, "image": "b.png"}), "not found"),
        (json.dumps({"conversations": [{"from": "gpt", "value": "A"}]}), "no human turn"),
    ):
        questions = tmp_path / "questions.jsonl"
        questions.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(
                ["--checkpoint", str(tmp_path), "--questions", str(questions), "--out", str(tmp_path / "answers.jsonl")]
            )
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{questions}: sample 1:" in err and problem in err, err
    assert not (tmp_path / "answers.jsonl").exists()


def test_question_formats(tmp_path):
    """The training format (the last human turn asks, a gpt turn after it is the reference) and
    LLaVA's evaluation format {"question_id", "image", "text"}."""
    from viq_megatron.evaluate import read_questions

    make_image(tmp_path / "a.png")
    turns = [("human", "<image>\nDescribe."), ("gpt", "A cat."), ("human", "What colour?"), ("gpt", "red")]
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps({"id": "x", "image": "a.png", "conversations": [{"from": f, "value": v} for f, v in turns]})
        + "\n"
        + json.dumps({"question_id": 7, "image": "a.png", "text": "What is it?"})
        + "\n"
    )
    first, second = read_questions(questions)
    assert (first.id, first.question, first.reference, len(first.sample.turns)) == ("x", "What colour?", "red", 3)
    assert (second.id, second.question, second.reference) == (7, "What is it?", None)
    assert second.sample.turns[0].text == "<image>\nWhat is it?" and len(second.sample.images) == 1


def test_prompt_is_the_training_layout_up_to_the_answer(tmp_path):
    """A question's tokens are a training sample's up to its first loss token, and that token is
    the answer's first word: the space before it belongs to the answer's span, so SentencePiece's
    '▁red' is learned (it used to straddle the span's start and fall out of the loss)."""
    from viq_megatron.config import ImageConfig
    from viq_megatron.data.conversations import Sample
    from viq_megatron.data.multimodal import encode_sample
    from viq_megatron.data.text import SentencePieceTokenizer, Turn

    texts = ["What colour is the circle?", "red", "How many squares are there?", "2"] * 5
    tokenizer = SentencePieceTokenizer.train(texts, 400, tmp_path / "sp")
    image = make_image(tmp_path / "a.png", size=(64, 48))
    rules = ImageConfig(min_pixels=1024, max_pixels=4096)
    for question, answer in (("What colour is the circle?", "red"), ("How many squares are there?", "2")):
        turns = (Turn("user", f"<image>\n{question}"), Turn("assistant", answer))
        full = encode_sample(Sample("s", turns, (image,)), tokenizer, rules, 16, None)
        prompt = encode_sample(Sample("s", turns[:1], (image,)), tokenizer, rules, 16, None, generation_prompt=True)
        first = full.loss_flags.index(True)
        assert full.token_ids[:first] == prompt.token_ids and full.visual_slots == prompt.visual_slots
        answer_ids = [i for i, flag in zip(full.token_ids, full.loss_flags) if flag]
        assert answer_ids[-1] == tokenizer.eos_id and tokenizer.decode(answer_ids[:-1]).strip() == answer


def test_a_missing_checkpoint_or_unwritable_output_stops_before_any_answer(trained, tmp_path):
    """Both are one line naming the path, exit 2, before a model is built (so no answer is computed
    and then lost); a missing checkpoint is named, not the tokenizer the run would have kept."""
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from evaluate_checks import command_line

    work, _ = trained
    (tmp_path / "file").write_text("")
    for checkpoint, out, named in (
        (tmp_path / "no_run", tmp_path / "a.jsonl", tmp_path / "no_run"),
        (work / "run", tmp_path / "file/a.jsonl", tmp_path / "file/a.jsonl"),
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "viq_megatron.evaluate",
                "--checkpoint",
                str(checkpoint),
                "--questions",
                str(work / "data/qa_val.jsonl"),
                "--out",
                str(out),
                *command_line(work),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2 and result.stderr.startswith(f"error: {named}: "), result.stderr[-2000:]
        assert result.stderr.count("\n") == 1 and "answering" not in result.stderr, result.stderr
