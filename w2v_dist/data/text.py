"""Transcript normalisation and the CTC character vocabulary.

Policy (the same at sharding, training and evaluation): upper-case; sentence punctuation ``. , ? ! ; : " ( )``
is removed and ``-`` becomes a space; whitespace collapses to single spaces; what remains must be A-Z,
apostrophe or space. Anything else (digits, other symbols) is *rejected*, not guessed at, because a digit's
spoken form ("1990") is ambiguous.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

WORD_DELIMITER = "|"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
LIBRISPEECH_CHARS = "ETAONIHSRDLUMWCFGYPBVK'XJQZ"
"""LibriSpeech's characters in the frequency order of facebook/wav2vec2-base-960h's vocabulary."""

_ALLOWED = re.compile(r"^[A-Z' ]*$")
_REMOVED = str.maketrans({c: None for c in '.,?!;:"()'} | {"-": " "})
_SPACES = re.compile(r"\s+")


class TranscriptError(ValueError):
    """A transcript that the vocabulary policy rejects; the message is the reject reason."""


def normalize(text: str) -> str:
    """Apply the vocabulary policy; raise :class:`TranscriptError` for what it rejects."""
    cleaned = _SPACES.sub(" ", text.upper().translate(_REMOVED)).strip()
    if not cleaned:
        raise TranscriptError("empty transcript")
    if not _ALLOWED.match(cleaned):
        bad = sorted({c for c in cleaned if not _ALLOWED.match(c)})
        raise TranscriptError(f"characters outside the vocabulary: {''.join(bad)!r}")
    return cleaned


def label_length(text: str) -> int:
    """CTC target length of a normalised transcript: one token per character, spaces become ``|``."""
    return len(text)


def build_vocab(texts: Iterable[str]) -> dict[str, int]:
    """A ``Wav2Vec2CTCTokenizer`` vocabulary for the characters seen, ordered like wav2vec2-base-960h."""
    seen = set().union(*texts) - {" "}
    ordered = [c for c in LIBRISPEECH_CHARS if c in seen] + sorted(seen - set(LIBRISPEECH_CHARS))
    tokens = [*SPECIAL_TOKENS, WORD_DELIMITER, *ordered]
    return {token: index for index, token in enumerate(tokens)}


def librispeech_vocab() -> dict[str, int]:
    """The full LibriSpeech character vocabulary (32 tokens, the layout of wav2vec2-base-960h)."""
    return build_vocab([LIBRISPEECH_CHARS])


def write_vocab(vocab: dict[str, int], path: str | Path) -> None:
    """Write ``vocab.json`` as ``Wav2Vec2CTCTokenizer`` reads it."""
    Path(path).write_text(json.dumps(vocab, indent=1, ensure_ascii=False) + "\n")


class CharLabeler:
    """CTC labels for normalised text exactly as ``Wav2Vec2CTCTokenizer`` produces them (one id per character,
    spaces as the word delimiter, unknown characters as ``<unk>``), without its per-call overhead, which was
    a sixth of a loader worker's time. Other tokenizers are called as they are."""

    def __init__(self, tokenizer: Any) -> None:
        from transformers import Wav2Vec2CTCTokenizer

        self.tokenizer = tokenizer
        fast = isinstance(tokenizer, Wav2Vec2CTCTokenizer) and not getattr(tokenizer, "do_lower_case", False)
        self.vocab: dict[str, int] | None = dict(tokenizer.get_vocab()) if fast else None
        self.unk = tokenizer.unk_token_id
        self.delimiter = getattr(tokenizer, "word_delimiter_token", WORD_DELIMITER)

    def __call__(self, text: str) -> list[int]:
        if self.vocab is None:
            return list(self.tokenizer(text).input_ids)
        vocab, unk = self.vocab, self.unk
        return [vocab.get(c, unk) for c in text.replace(" ", self.delimiter)]
