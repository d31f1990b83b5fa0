"""Any language: a French corpus (espeak-ng) with accents, guillemets and dashes shards with ``--alphabet
any``, builds its vocabulary from the transcripts, trains on 2 ranks from a pre-trained-only model and
transcribes with the exported processor."""

from __future__ import annotations

import json
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from tests.support.launch import REPO, run_deepspeed
from tests.support.runs import check, overrides
from w2v_dist.model import init_model
from w2v_dist.prep.synth import SAMPLE_RATE, speak

pytestmark = pytest.mark.slow
WORDS = ("bonjour", "café", "numéro", "ça", "va", "été", "forêt", "garçon", "île", "où", "déjà",
         "très", "bien", "l'école", "noël")
ASCII = set(string.printable)


def french_corpus(root: Path, count: int, seed: int) -> Path:
    """FLACs spoken by espeak-ng's French voices and a TSV manifest of their raw, punctuated transcripts."""
    rng = random.Random(seed)
    rows = []
    for n in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 4))]
        raw = f"{words[0].capitalize()}, « {' '.join(words[1:])} » – {rng.choice(('oui', 'non'))} ?"
        path = root / f"fr{seed}-{n:03d}.flac"
        sf.write(path, speak(raw, ("fr", "fr+f3")[n % 2], 150), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        rows.append(f"{path}\t{raw}")
    # A digit (rejected: its spoken form is ambiguous) and a character in one transcript only (rare).
    for name, raw in (("digit", "Le café numéro 1"), ("rare", "Œuvre bien")):
        path = root / f"fr{seed}-{name}.flac"
        sf.write(path, speak(raw, "fr", 150), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        rows.append(f"{path}\t{raw}")
    manifest = root / f"manifest{seed}.tsv"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return manifest


def shard(manifest: Path, out: Path) -> dict:
    check(subprocess.run([sys.executable, "-m", "w2v_dist", "shard", "--manifest", str(manifest), "--out",
                          str(out), "--alphabet", "any", "--min-char-count", "2", "--shard-size-mb", "0.2",
                          "--workers", "2"],
                         capture_output=True, text=True, cwd=REPO, timeout=300))
    return json.loads((out / "index.json").read_text())


def test_a_french_corpus_shards_trains_and_transcribes(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    train = shard(french_corpus(tmp_path / "audio", 40, seed=1), tmp_path / "shards" / "train")
    dev = shard(french_corpus(tmp_path / "audio", 8, seed=2), tmp_path / "shards" / "dev")
    assert train["text_policy"]["alphabet"] == "any"
    assert train["totals"]["written"] == 40 and train["totals"]["rejected"] == 2
    reasons = [json.loads(line)["reason"]
               for line in (tmp_path / "shards" / "train" / "rejects.jsonl").open()]
    assert sorted(reasons) == ["characters outside the vocabulary: '1'",
                               "rare characters 'Œ' (in fewer than 2 transcripts)"]
    vocab = json.loads((tmp_path / "shards" / "train" / "vocab.json").read_text())
    assert ({"É", "Ç", "Ê", "Î", "Ù", "À", "È", "Ë", "'"} <= set(vocab) and "Œ" not in vocab
            and "«" not in vocab)

    # A pre-trained-only model (no tokenizer): the CTC head is built from the shards' vocabulary.
    model = init_model(tmp_path / "pretrained", "tiny")
    for name in ("vocab.json", "tokenizer_config.json", "processor_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    out = tmp_path / "run"
    shard_dirs = {"train-clean-100": tmp_path / "shards" / "train", "dev-clean": tmp_path / "shards" / "dev"}
    check(run_deepspeed(["--config", "configs/debug.yaml", *overrides(
        shard_dirs, model, out,
        **{"trainer.max_steps": 4, "trainer.eval_every": 0, "trainer.save_every": 0})]))
    exported = json.loads((out / "final" / "vocab.json").read_text())
    assert exported == vocab
    rows = [json.loads(line) for line in (out / "eval" / "step_00000004" / "dev-clean.jsonl").open()]
    assert len(rows) == dev["totals"]["written"] and any("Ç" in r["reference"] or "É" in r["reference"]
                                                         for r in rows)
    assert (any(set(r["hypothesis"]) - ASCII
                for r in rows)), "training's scorer should decode the script's letters"

    from transformers import Wav2Vec2Processor

    processor = Wav2Vec2Processor.from_pretrained(out / "final")
    assert processor.tokenizer.unk_token_id not in processor.tokenizer("ÇA VA À L'ÉCOLE").input_ids
    flac = tmp_path / "audio" / "fr2-000.flac"  # a dev utterance
    done = subprocess.run([sys.executable, "-m", "w2v_dist", "transcribe", "--model", str(out / "final"),
                           str(flac)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    check(done)
    texts = [line.removeprefix(f"{flac}\t") for line in done.stdout.splitlines()
             if line.startswith(f"{flac}\t")]
    assert len(texts) == 1, done.stdout
    text = texts[0]
    # Four updates leave the model close to its random start: it spells noise, but in the corpus' letters,
    # accents included. transcribe is the pipeline's text, special tokens and all (docs/evaluation.md).
    letters = re.sub("|".join(map(re.escape, processor.tokenizer.all_special_tokens)), "", text)
    assert letters.strip(), f"the model transcribes nothing: {done.stdout!r}"
    assert set(letters) <= {t for t in vocab if len(t) == 1} - {"|"} | {" "} and set(letters) - ASCII, text
