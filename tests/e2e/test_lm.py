"""`w2v-dist build-lm` (KenLM's lmplz, built by `make setup`) and beam search with that LM against greedy
decoding.

Not skipped when KenLM is missing: `make setup` builds it, and a missing tool is a failure here."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import jiwer
import pytest
import torch
from transformers import Wav2Vec2CTCTokenizer

from w2v_dist.cli import main
from w2v_dist.data.index import load_shard_set
from w2v_dist.decoding import BeamDecoder, GreedyDecoder
from w2v_dist.lm import shard_transcripts


def test_build_lm_from_shards_and_text_writes_arpa_and_binary(shard_dirs: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import kenlm

    extra = tmp_path / "extra.txt"
    extra.write_text("ONE TWO THREE\n\nFOUR FIVE\n")
    arpa, binary = tmp_path / "lm" / "words.arpa", tmp_path / "lm" / "words.bin"
    train = str(shard_dirs["train-clean-100"])
    assert main(["build-lm", "--shards", train, "--text", str(extra), "--order", "3", "--out", str(arpa),
                 "--binary", str(binary)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sentences"] == load_shard_set(train).total_samples + 2
    assert set(summary["ngrams"]) == {"1", "2", "3"} and all(n > 0 for n in summary["ngrams"].values())
    assert not list(arpa.parent.glob(".lm-*")), "the temporary corpus is removed"

    text_model, binary_model = kenlm.Model(str(arpa)), kenlm.Model(str(binary))
    assert text_model.order == 3
    sentence = "ONE TWO THREE"
    assert text_model.score(sentence) == pytest.approx(binary_model.score(sentence), abs=1e-3)
    assert text_model.score(sentence) > text_model.score("OEN TOW THRE") + 3  # words vs non-words (log10)


def test_build_lm_refuses_nothing_to_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["build-lm", "--text", str(empty), "--out", str(tmp_path / "x.arpa")]) == 2
    assert "no text" in capsys.readouterr().err
    assert main(["build-lm", "--out", str(tmp_path / "x.arpa")]) == 2


def noisy_emissions(texts: list[str], tokenizer: Wav2Vec2CTCTokenizer, error_rate: float,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC logits that spell each text (one frame per character, then a blank), except that a fraction of the
    letters lose narrowly to another letter: an acoustic model unsure between similar sounds."""
    vocab = tokenizer.get_vocab()
    letters = [t for t in vocab if len(t) == 1 and t.isalpha()]
    rng = random.Random(seed)
    rows = []
    for text in texts:
        frames = []
        for char in text.replace(" ", tokenizer.word_delimiter_token):
            for token, noisy in ((char, char.isalpha() and rng.random() < error_rate),
                                 (tokenizer.pad_token, False)):
                row = torch.full((len(vocab),), -6.0)
                row[vocab[token]] = 0.0
                if noisy:
                    row[vocab[rng.choice([c for c in letters if c != token])]] = 0.4
                frames.append(row)
        rows.append(torch.stack(frames))
    lengths = torch.tensor([len(r) for r in rows])
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-6.0), lengths


def test_beam_search_with_a_built_lm_beats_greedy_where_the_words_are_known(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path) -> None:
    """Dev transcripts spelled by an unsure acoustic model: greedy keeps its letter errors, beam search alone
    does too, and beam search with a 3-gram LM built from the *training* transcripts (same lexicon) repairs
    most."""
    arpa = tmp_path / "train.arpa"
    assert main(["build-lm", "--shards", str(shard_dirs["train-clean-100"]), "--order", "3",
                 "--out", str(arpa)]) == 0
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(tiny_model)
    references = list(shard_transcripts(str(shard_dirs["dev-clean"])))
    logits, frames = noisy_emissions(references, tokenizer, error_rate=0.15)

    greedy = jiwer.wer(references, GreedyDecoder(tokenizer)(logits, frames))
    beam = jiwer.wer(references, BeamDecoder(tokenizer, beam_width=32)(logits, frames))
    with_lm = jiwer.wer(references,
                        BeamDecoder(tokenizer, arpa, beam_width=32, alpha=1.0, beta=0.5)(logits, frames))
    assert greedy > 0.2, greedy
    assert beam == pytest.approx(greedy), (beam, greedy)  # the search alone cannot know the words
    assert with_lm < greedy / 3, (with_lm, greedy)


def test_binary_lm_decodes_as_its_arpa_with_the_word_list_build_lm_writes(
        shard_dirs: dict, tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pyctcdecode reads the unigram list only from an ARPA file; ``build-lm --binary`` writes it beside the
    binary and the decoder passes it on, so both forms of one LM give the same transcripts. Without any word
    list the decoder warns (WARNING, not swallowed) that decoding is degraded."""
    arpa, binary = tmp_path / "arpa" / "train.arpa", tmp_path / "bin" / "train.bin"
    assert main(["build-lm", "--shards", str(shard_dirs["train-clean-100"]), "--order", "3",
                 "--out", str(arpa), "--binary", str(binary)]) == 0
    assert (tmp_path / "bin" / "train.unigrams.txt").is_file()
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(tiny_model)
    references = list(shard_transcripts(str(shard_dirs["dev-clean"])))
    # Half the letters wrong and a narrow beam: the partial-word scores the word list gives keep the right
    # prefixes in the beam (with 32 beams this corpus decodes perfectly either way).
    logits, frames = noisy_emissions(references, tokenizer, error_rate=0.5)

    def wer(lm: Path) -> float:
        return float(jiwer.wer(references, BeamDecoder(tokenizer, lm, beam_width=4, alpha=1.0, beta=0.5)(
            logits, frames)))

    with caplog.at_level(logging.WARNING):
        from_arpa, from_binary = wer(arpa), wer(binary)
    assert from_binary == from_arpa, (from_binary, from_arpa)
    assert not [r for r in caplog.records if "degraded" in r.getMessage()]

    (tmp_path / "bin" / "train.unigrams.txt").unlink()
    with caplog.at_level(logging.WARNING):
        without_words = wer(binary)
    assert [r for r in caplog.records if "decoding degraded" in r.getMessage()
            and r.levelno == logging.WARNING]
    assert without_words > from_arpa + 0.1, (without_words, from_arpa)  # what the word list is for
