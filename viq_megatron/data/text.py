"""Text tokenizers and conversation rendering, with `<image>` placeholders kept as slots.

A conversation renders through the tokenizer's chat template where it has one (the
checkpoint's own format), else through a plain "User:/Assistant:" template. Loss is
taken on the assistant's tokens only (its answer and its end-of-turn marker). Each
`<image>` in the text becomes a slot that the image's visual tokens fill later.
"""

from __future__ import annotations

import hashlib
import io
import json
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import sentencepiece as spm
from transformers import AutoTokenizer

from viq_megatron.runtime.errors import InputError, first_line

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    text: str


@dataclass
class RenderedConversation:
    """Token pieces in order: ("text", ids, loss_flags) or ("image", image_index)."""

    pieces: list[tuple]

    def num_text_tokens(self) -> int:
        return sum(len(p[1]) for p in self.pieces if p[0] == "text")


class TextTokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render(self, turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation's text and the character spans the loss is taken on."""
        ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...

    def fingerprint(self) -> str:
        """A hash of everything that decides the token ids (vocabulary, merges, template)."""
        ...


def tokenize_conversation(
    tokenizer: TextTokenizer, turns: Sequence[Turn], generation_prompt: bool = False
) -> RenderedConversation:
    """Renders, splits at `<image>` and tokenizes each text segment with its loss flags.
    `generation_prompt`: the conversation only up to where the next assistant answer starts,
    laid out as training lays it out (the prompt to generate that answer from)."""
    if generation_prompt:
        text, spans = tokenizer.render([*turns, Turn("assistant", "")])
        text, spans = text[: spans[-1][0]], []
    else:
        text, spans = tokenizer.render(turns)
    pieces: list[tuple] = []
    start = 0
    for image_index, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if image_index:
            pieces.append(("image", image_index - 1))
        if segment:
            ids, offsets = tokenizer.encode_with_offsets(segment)
            flags = [any(a <= start + lo and start + hi <= b for a, b in spans) for lo, hi in offsets]
            pieces.append(("text", ids, flags))
        start += len(segment) + len(IMAGE_PLACEHOLDER)
    return RenderedConversation(pieces)


def _plain_render(turns: Sequence[Turn], eos: str) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    for turn in turns:
        if turn.role == "assistant":
            # The span starts at the space before the answer: tokenizers that fold a space into
            # the next word (SentencePiece's "▁red") then keep the answer's first token in it.
            text += "Assistant:"
            spans.append((len(text), len(text) + 1 + len(turn.text) + len(eos)))
            text += " " + turn.text + eos + "\n"
        else:
            text += ("System: " if turn.role == "system" else "User: ") + turn.text + "\n"
    return text, spans


class HFTokenizer:
    """A Hugging Face tokenizer (fast), with its chat template where it has one."""

    def __init__(self, path: str | Path):
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a readable Hugging Face tokenizer ({first_line(e)})") from None
        self.vocab_size = len(self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id

    def fingerprint(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        rules = backend.to_str() if backend is not None else json.dumps(self.tokenizer.get_vocab(), sort_keys=True)
        return hashlib.sha256(f"{rules}\n{self.tokenizer.chat_template}".encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def render(self, turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]]]:
        if not self.tokenizer.chat_template:
            return _plain_render(turns, self.tokenizer.eos_token or "")
        messages = [{"role": t.role, "content": t.text} for t in turns]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            # The assistant's span: from after the generation prompt to the end of its turn.
            before = self.tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = self.tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (text.startswith(before) and text.startswith(through)):
                raise ValueError("the chat template does not render conversations prefix by prefix")
            spans.append((len(before), len(through)))
        return text, spans


class SentencePieceTokenizer:
    """A small SentencePiece model trained on the fly (tiny test LLMs), plain template."""

    EOS = "</s>"

    def __init__(self, model_file: str | Path):
        self.model_file = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (OSError, RuntimeError) as e:
            raise InputError(f"{model_file}: not a readable SentencePiece model ({first_line(e)})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_prefix: str | Path) -> SentencePieceTokenizer:
        texts = sorted(set(texts))
        if not any(t.strip() for t in texts):
            raise InputError(f"{model_prefix}.model: no text to train the SentencePiece tokenizer on")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            byte_fallback=True,
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
            hard_vocab_limit=False,
        )
        path = Path(f"{model_prefix}.model")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.getvalue())
        return cls(path)

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # The eos marker is a control symbol: tokenize around it, then place its id.
        ids, offsets, start = [], [], 0
        for k, part in enumerate(text.split(self.EOS)):
            if k:
                ids.append(self.eos_id)
                offsets.append((start - len(self.EOS), start))
            proto = self.sp.encode(part, return_type="proto")
            for piece in proto.pieces:
                ids.append(piece.id)
                offsets.append((start + piece.begin, start + piece.end))
            start += len(part) + len(self.EOS)
        return ids, offsets

    def render(self, turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]]]:
        return _plain_render(turns, self.EOS)


def open_text_tokenizer(path: str | Path) -> TextTokenizer:
    """A SentencePiece `.model` file or a Hugging Face tokenizer folder, told apart by the name:
    the one rule every command line taking a text tokenizer's path follows."""
    return SentencePieceTokenizer(path) if str(path).endswith(".model") else HFTokenizer(path)


def stop_ids(tokenizer: TextTokenizer) -> set[int]:
    """Token ids that end an answer: EOS, and the special tokens that close an assistant turn in
    the chat template (e.g. Qwen2.5's <|im_end|>, where EOS is <|endoftext|>)."""
    pieces = tokenize_conversation(tokenizer, [Turn("user", "Hi"), Turn("assistant", "Hello")]).pieces
    answer = [i for piece in pieces if piece[0] == "text" for i, flag in zip(piece[1], piece[2]) if flag]
    special = set(getattr(getattr(tokenizer, "tokenizer", None), "all_special_ids", ()))
    return {tokenizer.eos_id, *(i for i in answer if i in special)}


def normalize(answer: str) -> str:
    """For exact match: lower case, single spaces, no punctuation around words or at the ends."""
    words = (w.strip(string.punctuation) for w in answer.lower().split())
    return " ".join(w for w in words if w)
