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
    seen = {c for text in texts for c in text if c != " "}
    ordered = [c for c in LIBRISPEECH_CHARS if c in seen] + sorted(seen - set(LIBRISPEECH_CHARS))
    tokens = [*SPECIAL_TOKENS, WORD_DELIMITER, *ordered]
    return {token: index for index, token in enumerate(tokens)}


def librispeech_vocab() -> dict[str, int]:
    """The full LibriSpeech character vocabulary (32 tokens, the layout of wav2vec2-base-960h)."""
    return build_vocab([LIBRISPEECH_CHARS])


def write_vocab(vocab: dict[str, int], path: str | Path) -> None:
    """Write ``vocab.json`` as ``Wav2Vec2CTCTokenizer`` reads it."""
    Path(path).write_text(json.dumps(vocab, indent=1, ensure_ascii=False) + "\n")
