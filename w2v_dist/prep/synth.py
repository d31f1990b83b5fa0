"""A synthetic LibriSpeech-layout corpus spoken by espeak-ng, for demos and tests (no download needed).

Each (voice, speed) pair is a distinct speaker. Sentences draw from a small command-and-digit lexicon so that
a tiny model can visibly learn it on a CPU in minutes.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from w2v_dist.data.audio import SAMPLE_RATE, decode, to_16k_mono
from w2v_dist.prep.workers import process_pool

LEXICON = ("ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE",
           "YES", "NO", "UP", "DOWN", "LEFT", "RIGHT", "GO", "STOP")
VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb+m3", "en-029", "en-gb-scotland+f2")
SPEEDS = (140, 175)
SUBSETS = {"train-clean-100": 0, "dev-clean": 1}
"""Subsets written and the seed offset that keeps their sentences apart."""


@dataclass(frozen=True)
class SynthUtterance:
    subset: str
    speaker: int
    chapter: int
    index: int
    voice: str
    speed: int
    text: str

    @property
    def key(self) -> str:
        return f"{self.speaker}-{self.chapter}-{self.index:04d}"


def require_espeak() -> str:
    """Path of espeak-ng, or a one-line instruction."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng is not installed: run 'sudo apt-get install espeak-ng' "
                           "(Debian/Ubuntu)")
    return path


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """16 kHz mono float32 audio of ``text``."""
    wav = subprocess.run([require_espeak(), "-v", voice, "-s", str(speed), "--stdout", text],
                         check=True, capture_output=True).stdout
    return to_16k_mono(*decode(wav))


def plan_corpus(utterances: int, dev_utterances: int, seed: int = 0) -> list[SynthUtterance]:
    """The utterances to synthesise: train and dev sentences never repeat each other."""
    plan: list[SynthUtterance] = []
    seen: set[str] = set()
    for subset, count in (("train-clean-100", utterances), ("dev-clean", dev_utterances)):
        rng = random.Random(seed * 1000 + SUBSETS[subset])
        for n in range(count):
            while True:
                text = " ".join(rng.choice(LEXICON) for _ in range(rng.randint(1, 4)))
                if text not in seen:
                    break
            seen.add(text)
            voice_index = n % (len(VOICES) * len(SPEEDS))
            voice, speed = VOICES[voice_index % len(VOICES)], SPEEDS[voice_index // len(VOICES)]
            speaker = 100 + voice_index
            chapter = 1000 + 10 * SUBSETS[subset] + speaker % 10
            plan.append(SynthUtterance(subset, speaker, chapter, n, voice, speed, text))
    return plan


def _write_audio(utt: SynthUtterance, root: Path) -> None:
    path = root / utt.subset / str(utt.speaker) / str(utt.chapter) / f"{utt.key}.flac"
    if not path.exists():
        audio = speak(utt.text, utt.voice, utt.speed)
        tmp = path.with_suffix(".tmp.flac")
        sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        tmp.rename(path)


def synthesize(out_dir: str | Path, utterances: int, dev_utterances: int | None = None, seed: int = 0,
               workers: int = 2) -> Path:
    """Write ``OUT/LibriSpeech/{train-clean-100,dev-clean}/<spk>/<chapter>/...``; reuse what exists."""
    require_espeak()
    root = Path(out_dir) / "LibriSpeech"
    plan = plan_corpus(utterances, dev_utterances if dev_utterances is not None else max(8, utterances // 8),
                       seed)
    transcripts: dict[Path, list[str]] = {}
    for utt in plan:
        chapter_dir = root / utt.subset / str(utt.speaker) / str(utt.chapter)
        chapter_dir.mkdir(parents=True, exist_ok=True)
        transcripts.setdefault(chapter_dir / f"{utt.speaker}-{utt.chapter}.trans.txt", []).append(
            f"{utt.key} {utt.text}")
    with process_pool(workers) as pool:
        list(pool.map(_write_audio, plan, [root] * len(plan), chunksize=16))
    for path, lines in transcripts.items():
        path.write_text("\n".join(lines) + "\n")
    return root
