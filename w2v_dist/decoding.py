"""CTC decoders for dev-set scoring (training and evaluate): greedy best path, or pyctcdecode's beam search
with an optional KenLM.

Both decoders exclude the tokenizer's special tokens other than the blank (``<s>``, ``</s>``, ``<unk>``) from
the search: no normalised transcript contains them, so emitting one can only be an error.

With a KenLM binary, pyctcdecode cannot read the word list it scores partial words with (it reads it only
from an ARPA file) and decodes worse without it, so the binary's unigrams come from a file ``build-lm``
writes beside it (``unigram_file``) or from an ARPA of the same name; where neither exists the decoder warns
that it is degraded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Wav2Vec2CTCTokenizer

CTCDecoder = Callable[[torch.Tensor, torch.Tensor], list[str]]
"""(logits ``[batch, frames, vocab]``, real frame counts ``[batch]``) → one text per utterance."""

INSTALL_HINT = ("beam search needs pyctcdecode (and kenlm for --lm): `make setup` installs both; by hand: "
                "pip install --no-deps 'pyctcdecode==0.5.0' 'pygtrie>=2.1,<3' && pip install kenlm   (see "
                "docs/evaluation.md)")


class DecoderUnavailable(RuntimeError):
    """The optional beam-search packages are missing."""


log = logging.getLogger(__name__)

_NOISE = (
    "Found entries of length > 1 in alphabet",  # <s>/</s>: masked out in the search (BeamDecoder.banned)
    "Only %s unigrams passed as vocabulary",  # any LM built from a small corpus
    "Unigrams not provided and cannot be automatically")  # said by ``lm_unigrams``, naming the fix


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE)


def unigram_file(lm_path: str | Path) -> Path:
    """Where ``build-lm`` writes an LM's word list, one word a line: ``train.bin`` →
    ``train.unigrams.txt``."""
    return Path(lm_path).with_suffix(".unigrams.txt")


def lm_unigrams(lm_path: str | Path) -> list[str] | None:
    """The words of a binary LM, from ``unigram_file`` or an ARPA file beside it; ``None`` for an ARPA LM
    (which pyctcdecode reads itself) and, with a warning, where no word list is found."""
    lm = Path(lm_path)
    if lm.suffix == ".arpa":
        return None
    listed = unigram_file(lm)
    if listed.is_file():
        return [word for word in listed.read_text(encoding="utf-8").split("\n") if word]
    arpa = lm.with_suffix(".arpa")
    if arpa.is_file():
        from pyctcdecode.language_model import load_unigram_set_from_arpa

        return sorted(load_unigram_set_from_arpa(str(arpa)))
    log.warning("decoding degraded: %s is not an ARPA file and neither %s nor %s lists its words; beam "
                "search without the unigram list scores partial words worse (build-lm --binary writes %s)",
                lm, listed.name, arpa.name, listed.name)
    return None


def banned_token_ids(tokenizer: Wav2Vec2CTCTokenizer) -> list[int]:
    """Ids of the special tokens other than the CTC blank and the word delimiter (which transformers also
    lists among ``all_special_tokens``, but which is the space of every transcript)."""
    vocab = tokenizer.get_vocab()
    keep = {tokenizer.pad_token, tokenizer.word_delimiter_token}
    return sorted(vocab[token] for token in set(tokenizer.all_special_tokens) - keep if token in vocab)


def beam_labels(tokenizer: Wav2Vec2CTCTokenizer) -> list[str]:
    """pyctcdecode's alphabet: the vocab in id order, blank ``<pad>`` as ``""`` and the delimiter ``|`` as
    ``" "``."""
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in ordered] != list(range(len(ordered))):
        raise ValueError("tokenizer ids are not contiguous from 0; cannot map logits columns to labels")
    return ["" if t == tokenizer.pad_token else " " if t == tokenizer.word_delimiter_token else t
            for t in ordered]


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
    """pyctcdecode prefix beam search; with ``lm_path`` (ARPA or KenLM binary) shallow fusion with that
    n-gram LM."""

    def __init__(self, tokenizer: Wav2Vec2CTCTokenizer, lm_path: str | Path | None = None, *,
                 beam_width: int = 100, alpha: float = 0.5, beta: float = 1.0) -> None:
        try:
            from pyctcdecode import build_ctcdecoder

            if lm_path is not None:
                if not Path(lm_path).is_file():
                    raise FileNotFoundError(f"language model not found: {lm_path}")
                # pyctcdecode only warns when kenlm is missing, then fails obscurely on the first LM call.
                import kenlm  # type: ignore[import-not-found]  # noqa: F401
        except ImportError as err:
            raise DecoderUnavailable(INSTALL_HINT) from err
        # Its other warnings (an LM's words the alphabet cannot spell, few known words) say decoding is
        # degraded.
        for name in ("pyctcdecode.alphabet", "pyctcdecode.decoder", "pyctcdecode.language_model"):
            if _not_noise not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_not_noise)
        unigrams = lm_unigrams(lm_path) if lm_path else None
        self.decoder = build_ctcdecoder(beam_labels(tokenizer),
                                        kenlm_model_path=str(lm_path) if lm_path else None,
                                        unigrams=unigrams, alpha=alpha, beta=beta)
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
