"""Transcript normalisation and the CTC character vocabulary.

A :class:`TextPolicy` is chosen when sharding, recorded in ``index.json`` and applied wherever text is
compared (references at sharding, hypotheses when scoring). The default is LibriSpeech's: Unicode NFKC;
upper-case; sentence punctuation (``. , ? ! ; : "``, quotes and brackets of any script) removed and dashes
made spaces; whitespace collapsed; what remains must be A-Z, apostrophe or space. ``alphabet="any"`` accepts
the letters (and combining marks) of every script instead, for other languages. Anything else (digits unless
kept, other symbols) *rejects* the utterance rather than being guessed at: a digit's spoken form ("1990") is
ambiguous.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORD_DELIMITER = "|"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
LIBRISPEECH_CHARS = "ETAONIHSRDLUMWCFGYPBVK'XJQZ"
"""LibriSpeech's characters in the frequency order of facebook/wav2vec2-base-960h's vocabulary."""

_SENTENCE_MARKS = set('.,?!;:"¿¡…·。、，？！；：؟،')
_APOSTROPHES = str.maketrans({c: "'" for c in "\u2019\u2018\u02bc\u0060\u00b4"})
_SPACES = re.compile(r"\s+")
CASES = ("upper", "lower", "keep")
UNICODE_FORMS = ("NFKC", "NFC", "none")
ALPHABETS = ("latin", "any")


class TranscriptError(ValueError):
    """A transcript that the vocabulary policy rejects; the message is the reject reason."""


@dataclass(frozen=True)
class TextPolicy:
    """How a transcript becomes CTC targets (see the module docstring)."""

    alphabet: str = "latin"
    """``latin``: A-Z and apostrophe (LibriSpeech); ``any``: letters and marks of every script."""
    case: str = "upper"
    """``upper``, ``lower`` or ``keep``."""
    unicode: str = "NFKC"
    """``NFKC`` (compatibility forms folded: ligatures, full-width letters), ``NFC`` or ``none``."""
    punctuation: str = "strip"
    """``strip`` sentence punctuation (dashes become spaces), or ``keep`` it as characters to transcribe."""
    digits: str = "reject"
    """``reject`` transcripts with digits, or ``keep`` digits as characters."""

    def __post_init__(self) -> None:
        for name, choices in (("alphabet", ALPHABETS), ("case", CASES), ("unicode", UNICODE_FORMS),
                              ("punctuation", ("strip", "keep")), ("digits", ("reject", "keep"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"text policy {name}={getattr(self, name)!r}: choose one of "
                                 f"{list(choices)}")

    @classmethod
    def from_index(cls, index: dict[str, Any]) -> TextPolicy:
        """The policy ``index.json`` records (shards written before it was recorded used the default)."""
        return cls(**index.get("text_policy", {}))

    def allows(self, char: str) -> bool:
        if char in " '":
            return True
        category = unicodedata.category(char)
        if self.digits == "keep" and category == "Nd":
            return True
        if self.punctuation == "keep" and category.startswith("P"):
            return True
        if self.alphabet == "latin":
            return "A" <= char.upper() <= "Z" and char.isascii()
        return category[0] in "LM"

    def normalize(self, text: str) -> str:
        """Apply the policy; raise :class:`TranscriptError` for what it rejects."""
        if self.unicode != "none":
            # self.unicode is checked in __post_init__
            text = unicodedata.normalize(self.unicode, text)  # type: ignore[arg-type]
        text = text.upper() if self.case == "upper" else text.lower() if self.case == "lower" else text
        text = text.translate(_APOSTROPHES)
        if self.punctuation == "strip":
            text = "".join(" " if unicodedata.category(c) == "Pd" else "" if _stripped(c) else c
                           for c in text)
        cleaned = _SPACES.sub(" ", text).strip()
        if not cleaned:
            raise TranscriptError("empty transcript")
        bad = sorted({c for c in cleaned if not self.allows(c)})
        if bad:
            raise TranscriptError(f"characters outside the vocabulary: {''.join(bad)!r}")
        return cleaned


def _stripped(char: str) -> bool:
    return char in _SENTENCE_MARKS or unicodedata.category(char) in ("Pi", "Pf", "Ps", "Pe")


LIBRISPEECH = TextPolicy()


def normalize(text: str, policy: TextPolicy = LIBRISPEECH) -> str:
    """``policy.normalize(text)``."""
    return policy.normalize(text)


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
    """CTC labels for normalised text exactly as ``Wav2Vec2CTCTokenizer`` produces them (one id per
    character, spaces as the word delimiter, unknown characters as ``<unk>``), without its per-call overhead,
    which was a sixth of a loader worker's time. Other tokenizers are called as they are."""

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
