"""LLaVA-style conversation data (the ViQ reference's format), read and validated.

A file is a JSON list or JSONL, one sample per entry:
    {"id": "...", "image": "a.jpg" | ["a.jpg", ...] | [{"img_path": "a.jpg", ...}],
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}
Each `<image>` placeholder takes the next image. Image paths resolve under the dataset
root; one that escapes it is refused unless allowed. A malformed sample is a
`SampleError` naming the file and the sample's index.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from viq_megatron.data.text import IMAGE_PLACEHOLDER, Turn
from viq_megatron.runtime.errors import InputError, parse_json, read_text

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleError(InputError):
    """A malformed sample: one line naming the file and the sample index."""


@dataclass(frozen=True)
class Sample:
    source: str  # "file:index"
    turns: tuple[Turn, ...]
    images: tuple[Path, ...]
    id: object = None  # the sample's own "id" (or "question_id"), when it has one


def _image_entries(raw) -> list[str]:
    if raw is None:
        return []
    entries = raw if isinstance(raw, list) else [raw]
    paths = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("img_path"), str):
            paths.append(entry["img_path"])
        elif isinstance(entry, str):
            paths.append(entry)
        else:
            raise ValueError(f"image entry {entry!r} is neither a path nor {{'img_path': path}}")
    return paths


def parse_sample(
    raw, root: Path, allow_outside_root: bool, questions: bool = False
) -> tuple[tuple[Turn, ...], tuple[Path, ...]]:
    """Validates one raw sample; raises ValueError with the problem (without file/index).
    `questions`: a question file (evaluation): the answer is optional, and LLaVA's evaluation
    format {"question_id", "image", "text"} is read as one human turn."""
    if not isinstance(raw, dict):
        raise ValueError("sample is not a JSON object")
    if questions and "conversations" not in raw and isinstance(raw.get("text"), str):
        text = raw["text"]
        if raw.get("image") and IMAGE_PLACEHOLDER not in text:
            text = f"{IMAGE_PLACEHOLDER}\n{text}"
        raw = {**raw, "conversations": [{"from": "human", "value": text}]}
    conversation = raw.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("empty or missing 'conversations'")
    turns = []
    for k, turn in enumerate(conversation):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {k} has no text 'value'")
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"turn {k} has unknown speaker {turn.get('from')!r}")
        turns.append(Turn(role, turn["value"]))
    if not questions and not any(t.role == "assistant" and t.text.strip() for t in turns):
        raise ValueError("no assistant answer to learn from")
    if any(IMAGE_PLACEHOLDER in t.text for t in turns if t.role == "assistant"):
        raise ValueError(f"{IMAGE_PLACEHOLDER} placeholder inside an assistant answer")
    images = _image_entries(raw.get("image", raw.get("images")))
    placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders != len(images):
        raise ValueError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    resolved = []
    root_real = os.path.realpath(root)
    for image in images:
        path = Path(os.path.realpath(root / image))
        if not allow_outside_root and os.path.commonpath([root_real, path]) != root_real:
            raise ValueError(
                f"image path {image!r} escapes the dataset root {root} (set data.allow_outside_root to allow)"
            )
        if not path.is_file():
            raise ValueError(f"image file {image!r} not found under {root}")
        resolved.append(path)
    return tuple(turns), tuple(resolved)


def read_conversations(
    path: str | Path, root: str | Path | None = None, allow_outside_root: bool = False, questions: bool = False
) -> Iterator[Sample | SampleError]:
    """Yields each sample, or a SampleError in its place; never stops early on a bad sample. A
    file that cannot be read at all is an InputError. `questions`: read a question file (see parse_sample)."""
    path = Path(path)
    root = Path(root) if root else path.parent
    text = read_text(path, "data")
    if text.lstrip().startswith("["):
        entries = list(enumerate(parse_json(text, str(path))))
    else:
        entries = []
        for index, line in enumerate(l for l in text.splitlines() if l.strip()):
            try:
                entries.append((index, parse_json(line, f"{path}: sample {index}")))
            except InputError as e:
                entries.append((index, SampleError(str(e))))
    for index, raw in entries:
        if isinstance(raw, SampleError):
            yield raw
            continue
        try:
            turns, images = parse_sample(raw, root, allow_outside_root, questions)
        except ValueError as e:
            yield SampleError(f"{path}: sample {index}: {e}")
            continue
        yield Sample(f"{path}:{index}", turns, images, raw.get("id", raw.get("question_id")))
