"""Finding utterances on disk: the LibriSpeech layout and user manifests (TSV or JSONL)."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """One utterance to shard: its key, where its audio is, and its raw transcript (``None`` if missing)."""

    key: str
    audio: Path | None
    text: str | None
    speaker: str = ""
    chapter: str = ""
    source: str = ""
    """Path relative to the corpus root, recorded in the shard json."""


@dataclass(frozen=True)
class Reject:
    key: str
    source: str
    reason: str


def librispeech_sources(root: str | Path, subsets: list[str]) -> list[Source]:
    """Utterances of LibriSpeech subsets; ``root`` may be the ``LibriSpeech`` dir or its parent.

    An audio file without a transcript line and a transcript line without its audio are both returned (with
    ``text`` or ``audio`` set to ``None``) so the sharder can record them as rejects.
    """
    base = Path(root)
    if not (base / subsets[0]).is_dir() and (base / "LibriSpeech").is_dir():
        base = base / "LibriSpeech"
    sources: list[Source] = []
    for subset in subsets:
        subset_dir = base / subset
        if not subset_dir.is_dir():
            found = sorted(entry.name for entry in base.iterdir() if entry.is_dir()) if base.is_dir() else []
            where = f"under {base}, which holds {', '.join(found)}" if found else (
                f"under {base}, which holds no subsets" if base.is_dir()
                else f"under {base}, which does not exist")
            raise FileNotFoundError(f"subset '{subset}' not found {where}")
        texts: dict[str, str] = {}
        audio: dict[str, str] = {}  # key -> path relative to base
        # os.scandir, not Path.glob: a million-file corpus is listed in seconds instead of a minute.
        for speaker in _subdirs(subset_dir):
            for chapter in _subdirs(speaker):
                for name in sorted(os.listdir(chapter)):
                    if name.endswith(".trans.txt"):
                        for line in Path(chapter, name).read_text(encoding="utf-8").splitlines():
                            if line.strip():
                                key, _, text = line.strip().partition(" ")
                                texts[key] = text
                    elif name.endswith(".flac"):
                        audio[name[:-5]] = (f"{subset}/{os.path.basename(speaker)}/"
                                            f"{os.path.basename(chapter)}/{name}")
        for key in sorted(set(texts) | set(audio)):
            speaker_id, chapter_id = (key.split("-") + ["", ""])[:2]
            rel = audio.get(key)
            sources.append(Source(key, base / rel if rel else None, texts.get(key), speaker_id, chapter_id,
                                  rel or f"{subset}/{speaker_id}/{chapter_id}/{key}.flac"))
    return sources


def _subdirs(path: str | Path) -> list[str]:
    return sorted(entry.path for entry in os.scandir(path) if entry.is_dir())


def manifest_sources(manifest: str | Path) -> list[Source]:
    """Utterances listed in a TSV (``path<TAB>transcript[<TAB>speaker]``, optional header) or JSONL manifest.

    JSONL lines need ``path`` and ``text`` (``transcript`` accepted), optionally ``key`` and ``speaker``.
    Relative paths are resolved against the manifest's directory.
    """
    path = Path(manifest)
    rows: list[dict[str, str]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    else:
        with path.open(encoding="utf-8", newline="") as handle:
            for record in csv.reader(handle, delimiter="\t"):
                if record and record[0] != "path":
                    rows.append(dict(zip(("path", "text", "speaker"), record)))
    sources = []
    for row in rows:
        audio = Path(row["path"])
        audio = audio if audio.is_absolute() else path.parent / audio
        key = str(row.get("key") or audio.stem)
        text = row.get("text", row.get("transcript"))
        sources.append(Source(key, audio, text, str(row.get("speaker", "")), "", str(row["path"])))
    if dupes := sorted(k for k, n in Counter(s.key for s in sources).items() if n > 1):
        raise ValueError(f"{path}: duplicate keys {dupes[:5]}; give each line a unique 'key'")
    return sources
