"""Greedy CTC decoding and error counts. Rates are computed only from counts summed over all ranks."""

from __future__ import annotations

from dataclasses import dataclass, field

import jiwer
import torch


@dataclass
class ErrorCounts:
    """Summed edit operations and reference lengths; add them up across batches and ranks, divide at the end."""

    word_edits: int = 0
    words: int = 0
    char_edits: int = 0
    chars: int = 0
    utterances: int = 0
    samples: list[tuple[str, str, str]] = field(default_factory=list)
    """A few (key, reference, hypothesis) triples for logging."""

    def add(self, keys: list[str], references: list[str], hypotheses: list[str], keep_samples: int = 0) -> None:
        for key, ref, hyp in zip(keys, references, hypotheses):
            words = jiwer.process_words(ref, hyp)
            chars = jiwer.process_characters(ref, hyp)
            self.word_edits += words.substitutions + words.deletions + words.insertions
            self.words += len(ref.split())
            self.char_edits += chars.substitutions + chars.deletions + chars.insertions
            self.chars += len(ref)
            self.utterances += 1
            if len(self.samples) < keep_samples:
                self.samples.append((key, ref, hyp))

    def as_list(self) -> list[float]:
        return [self.word_edits, self.words, self.char_edits, self.chars, self.utterances]

    @classmethod
    def from_list(cls, values: list[float]) -> ErrorCounts:
        word_edits, words, char_edits, chars, utterances = (int(round(v)) for v in values)
        return cls(word_edits, words, char_edits, chars, utterances)

    @property
    def wer(self) -> float:
        return self.word_edits / self.words if self.words else float("nan")

    @property
    def cer(self) -> float:
        return self.char_edits / self.chars if self.chars else float("nan")


def greedy_ids(logits: torch.Tensor, frame_lengths: torch.Tensor) -> list[list[int]]:
    """Best path per utterance (argmax on the logits' device), cut at each utterance's real frame count."""
    best = logits.argmax(dim=-1).cpu()
    return [row[:length].tolist() for row, length in zip(best, frame_lengths.tolist())]
