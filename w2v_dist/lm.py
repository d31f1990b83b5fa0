"""N-gram language models for beam search (``evaluate --decoder beam --lm``): transcripts → KenLM's
``lmplz`` → ARPA (and ``build_binary`` → a binary that loads fast). The estimation is KenLM's (modified
Kneser-Ney); this module only gathers the text and runs the tools (``make setup`` builds them into
``.venv/bin``)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds

from w2v_dist.data.index import load_shard_set

log = logging.getLogger(__name__)

TOOLS_HINT = "KenLM's tools are built by `make setup` (see docs/evaluation.md#building-an-n-gram-lm)"


def lm_tool(name: str) -> str:
    """Path of a KenLM program: next to this interpreter (``make setup`` puts them in the venv), else on
    PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH: {TOOLS_HINT}")
    return found


def shard_transcripts(location: str) -> Iterator[str]:
    """The normalised transcripts of a shard set (what training reads), in index order."""
    shards = load_shard_set(location)
    for sample in wds.WebDataset(list(shards.urls), shardshuffle=False, empty_check=False):
        yield json.loads(sample["json"])["text"]


def text_lines(path: Path) -> Iterator[str]:
    """One sentence per non-empty line, used as written (match the case of the model's vocabulary)."""
    with path.open(encoding="utf-8") as lines:
        yield from (line.strip() for line in lines if line.strip())


def arpa_counts(arpa: Path) -> dict[int, int]:
    """``{order: n-gram count}`` from an ARPA header."""
    counts: dict[int, int] = {}
    with arpa.open(encoding="utf-8") as lines:
        for line in lines:
            if match := re.match(r"ngram (\d+)=(\d+)", line.strip()):
                counts[int(match[1])] = int(match[2])
            elif line.startswith("\\1-grams:"):
                break
    return counts


def arpa_unigrams(arpa: Path) -> list[str]:
    """The words of an ARPA file's 1-gram section, as pyctcdecode reads them from an ARPA (entries with a
    back-off)."""
    words, inside = [], False
    with arpa.open(encoding="utf-8") as lines:
        for line in lines:
            line = line.strip()
            if line == "\\1-grams:":
                inside = True
            elif line == "\\2-grams:":
                break
            elif inside and len(parts := line.split("\t")) == 3:
                words.append(parts[1])
    return words


def build_lm(sentences: Iterable[str], arpa: Path, order: int = 4,
             binary: Path | None = None) -> dict[str, object]:
    """Estimate an ``order``-gram LM with ``lmplz`` into ``arpa`` (and ``build_binary`` it into ``binary``,
    with its word list beside it: beam search needs it and cannot read it from a binary,
    ``w2v_dist.decoding.lm_unigrams``).

    ``--discount_fallback`` lets lmplz estimate small corpora (a dev-sized text), where its Kneser-Ney
    discounts cannot all be computed from count-of-counts; on a large corpus it changes nothing.
    """
    if order < 2:
        raise ValueError(f"order must be at least 2, got {order}")
    arpa.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=arpa.parent, prefix=".lm-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        count = words = 0
        with corpus.open("w", encoding="utf-8") as out:
            for sentence in sentences:
                out.write(sentence + "\n")
                count, words = count + 1, words + len(sentence.split())
        if not words:
            raise ValueError("no text to estimate a language model from")
        _run([lm_tool("lmplz"), "-o", str(order), "--discount_fallback", "-S", "20%", "-T", tmp,
              "--text", str(corpus), "--arpa", str(arpa)])
    if binary is not None:
        binary.parent.mkdir(parents=True, exist_ok=True)
        _run([lm_tool("build_binary"), str(arpa), str(binary)])
        unigrams = binary.with_suffix(".unigrams.txt")  # w2v_dist.decoding.unigram_file, without pyctcdecode
        unigrams.write_text("".join(f"{word}\n" for word in arpa_unigrams(arpa)), encoding="utf-8")
    return {"arpa": str(arpa), "sentences": count, "words": words, "ngrams": arpa_counts(arpa),
            **({"binary": str(binary), "unigrams": str(unigrams)} if binary is not None else {})}


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
