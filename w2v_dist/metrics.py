"""Error counts. Rates are computed only from counts summed over all utterances and ranks."""

from __future__ import annotations

from dataclasses import dataclass

import jiwer


@dataclass(kw_only=True)
class ErrorCounts:
    """Summed edit operations and reference lengths; add them up across utterances and ranks, divide at the
    end."""

    word_edits: int = 0
    words: int = 0
    char_edits: int = 0
    chars: int = 0
    utterances: int = 0

    def add(self, references: list[str], hypotheses: list[str]) -> None:
        """Count utterances the way jiwer does (an empty reference adds its insertions and no words)."""
        for ref, hyp in zip(references, hypotheses):
            words = jiwer.process_words(ref, hyp)
            chars = jiwer.process_characters(ref, hyp)
            self.word_edits += words.substitutions + words.deletions + words.insertions
            self.words += len(ref.split())
            self.char_edits += chars.substitutions + chars.deletions + chars.insertions
            self.chars += len(ref)
            self.utterances += 1

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(word_edits=self.word_edits + other.word_edits, words=self.words + other.words,
                           char_edits=self.char_edits + other.char_edits, chars=self.chars + other.chars,
                           utterances=self.utterances + other.utterances)

    @property
    def wer(self) -> float:
        return self.word_edits / self.words if self.words else float("nan")

    @property
    def cer(self) -> float:
        return self.char_edits / self.chars if self.chars else float("nan")
