"""CTC decoders for dev-set scoring (training and evaluate): greedy best path, or pyctcdecode's beam search with an
optional KenLM.

Both decoders exclude the tokenizer's special tokens other than the blank (``<s>``, ``</s>``, ``<unk>``) from the
search: no normalised transcript contains them, so emitting one can only be an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Wav2Vec2CTCTokenizer

CTCDecoder = Callable[[torch.Tensor, torch.Tensor], list[str]]
"""(logits ``[batch, frames, vocab]``, real frame counts ``[batch]``) → one text per utterance."""

INSTALL_HINT = ("beam search needs pyctcdecode (and kenlm for --lm): `make setup` installs both; by hand: pip install "
                "--no-deps 'pyctcdecode==0.5.0' 'pygtrie>=2.1,<3' && pip install kenlm   (see docs/evaluation.md)")


class DecoderUnavailable(RuntimeError):
    """The optional beam-search packages are missing."""


def banned_token_ids(tokenizer: Wav2Vec2CTCTokenizer) -> list[int]:
    """Ids of the special tokens other than the CTC blank and the word delimiter (which transformers also lists
    among ``all_special_tokens``, but which is the space of every transcript)."""
    vocab = tokenizer.get_vocab()
    keep = {tokenizer.pad_token, tokenizer.word_delimiter_token}
    return sorted(vocab[token] for token in set(tokenizer.all_special_tokens) - keep if token in vocab)


def beam_labels(tokenizer: Wav2Vec2CTCTokenizer) -> list[str]:
    """pyctcdecode's alphabet: the vocab in id order, blank ``<pad>`` as ``""`` and the delimiter ``|`` as ``" "``."""
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in ordered] != list(range(len(ordered))):
        raise ValueError("tokenizer ids are not contiguous from 0; cannot map logits columns to labels")
    return ["" if t == tokenizer.pad_token else " " if t == tokenizer.word_delimiter_token else t for t in ordered]


def greedy_ids(logits: torch.Tensor, frame_lengths: torch.Tensor) -> list[list[int]]:
    """Best path per utterance (argmax on the logits' device), cut at each utterance's real frame count."""
    best = logits.argmax(dim=-1).cpu()
    return [row[:length].tolist() for row, length in zip(best, frame_lengths.tolist())]


class GreedyDecoder:
    """Best path (argmax on the logits' device), collapsed and de-blanked by the tokenizer."""

    def __init__(self, tokenizer: Wav2Vec2CTCTokenizer) -> None:
        self.tokenizer = tokenizer
        self.banned = banned_token_ids(tokenizer)

    def __call__(self, logits: torch.Tensor, frames: torch.Tensor) -> list[str]:
        logits = logits.clone()
        logits[..., self.banned] = -torch.inf
        return list(self.tokenizer.batch_decode(greedy_ids(logits, frames)))


class BeamDecoder:
    """pyctcdecode prefix beam search; with ``lm_path`` (ARPA or KenLM binary) shallow fusion with that n-gram LM."""

    def __init__(self, tokenizer: Wav2Vec2CTCTokenizer, lm_path: str | Path | None = None, *, beam_width: int = 100,
                 alpha: float = 0.5, beta: float = 1.0) -> None:
        try:
            from pyctcdecode import build_ctcdecoder

            if lm_path is not None:
                if not Path(lm_path).is_file():
                    raise FileNotFoundError(f"language model not found: {lm_path}")
                # pyctcdecode only warns when kenlm is missing, then fails obscurely on the first LM call.
                import kenlm  # type: ignore[import-not-found]  # noqa: F401
        except ImportError as err:
            raise DecoderUnavailable(INSTALL_HINT) from err
        # The alphabet check warns about <s>/</s>; those columns are masked out below, so the warning is noise.
        logging.getLogger("pyctcdecode").setLevel(logging.ERROR)
        self.decoder = build_ctcdecoder(beam_labels(tokenizer), kenlm_model_path=str(lm_path) if lm_path else None,
                                        alpha=alpha, beta=beta)
        self.banned = banned_token_ids(tokenizer)
        self.beam_width = beam_width

    def __call__(self, logits: torch.Tensor, frames: torch.Tensor) -> list[str]:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_probs[..., self.banned] = -torch.inf
        rows = log_probs.cpu().numpy()
        return [self.decoder.decode(row[:length], beam_width=self.beam_width).strip()
                for row, length in zip(rows, frames.tolist())]


def make_decoder(kind: str, tokenizer: Wav2Vec2CTCTokenizer, lm_path: str | Path | None = None,
                 beam_width: int = 100, alpha: float = 0.5, beta: float = 1.0) -> CTCDecoder:
    """``greedy`` or ``beam``; an LM is only meaningful with ``beam``."""
    if kind == "greedy":
        if lm_path is not None:
            raise ValueError("--lm needs --decoder beam")
        return GreedyDecoder(tokenizer)
    if kind == "beam":
        return BeamDecoder(tokenizer, lm_path, beam_width=beam_width, alpha=alpha, beta=beta)
    raise ValueError(f"unknown decoder {kind!r}: use greedy or beam")
