"""The sharder's fast paths against the slow, trusted ones: tar headers against ``tarfile``, the FLAC
final-frame check against libsndfile and a bytewise CRC."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from w2v_dist.prep import flac
from w2v_dist.prep.shards import audio_shape
from w2v_dist.prep.tar_writer import tar_header, tarfile_header


def test_tar_header_is_byte_for_byte_tarfiles() -> None:
    rng = random.Random(0)
    names = ["".join(rng.choice("abcXYZ-_.0123456789/") for _ in range(rng.randint(1, 130)))
             for _ in range(3000)]
    names += ["é.flac", "a" * 99, "a" * 100, "1089-134686-0000.flac"]
    for name in names:
        size = rng.choice([0, 1, 511, 512, 513, rng.randint(0, 10**10), 8**11 - 1, 8**11])
        assert tar_header(name, size) == tarfile_header(name, size), (name, size)


def _bytewise_crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ int(flac._CRC16[(crc >> 8) ^ byte])
    return crc


@pytest.mark.parametrize("length", [0, 1, 2, 63, 64, 65, 1877, 4096, 8191, flac.MAX_FRAME_BYTES])
def test_vectorised_crc16_matches_the_bytewise_one(length: int) -> None:
    data = os.urandom(length)
    assert flac.crc16(data) == _bytewise_crc16(data)


def _speech_flac(path: Path, seconds: float, rate: int = 16_000, channels: int = 1) -> Path:
    rng = np.random.default_rng(int(seconds * 1000))
    audio = (0.1 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)
    sf.write(path, audio, rate, format="FLAC", subtype="PCM_16")
    return path


@pytest.mark.parametrize("seconds,rate,channels", [(3.3, 16_000, 1), (1.0, 16_000, 1), (2.0, 44_100, 2)])
def test_a_complete_flac_is_recognised_with_libsndfiles_shape(tmp_path: Path, seconds: float, rate: int,
                                                               channels: int) -> None:
    path = _speech_flac(tmp_path / "a.flac", seconds, rate, channels)
    with sf.SoundFile(path) as stream:
        assert flac.stream_shape(path) == (stream.frames, stream.samplerate, stream.channels)


def test_truncated_or_damaged_endings_are_never_vouched_for(tmp_path: Path) -> None:
    data = _speech_flac(tmp_path / "a.flac", 2.0).read_bytes()
    bad = tmp_path / "bad.flac"
    for cut in range(1, 6000, 13):  # every cut through the last frames
        bad.write_bytes(data[:-cut])
        assert flac.stream_shape(bad) is None, cut
        with pytest.raises((ValueError, RuntimeError, sf.LibsndfileError)):
            audio_shape(bad, full=False)
    final_frame = max(data.rfind(b"\xff\xf8"), data.rfind(b"\xff\xf9"))
    for position in range(final_frame, len(data), 7):  # any flipped bit in the final frame
        damaged = bytearray(data)
        damaged[position] ^= 1 << (position % 8)
        bad.write_bytes(bytes(damaged))
        assert flac.stream_shape(bad) is None, position


def test_other_files_fall_back_to_libsndfile(tmp_path: Path) -> None:
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(8000, dtype=np.float32), 16_000)
    assert flac.stream_shape(wav) is None
    assert audio_shape(wav, full=False) == (8000, 16_000, 1)
    tagged = tmp_path / "tagged.flac"  # an ID3v1 tag after the last frame
    tagged.write_bytes(_speech_flac(tmp_path / "b.flac", 1.5).read_bytes() + b"TAG" + bytes(125))
    assert flac.stream_shape(tagged) is None
    assert audio_shape(tagged, full=False)[0] == 24_000


def test_workers_fork_only_while_torch_is_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from w2v_dist.prep.workers import start_method

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert start_method() == "fork"
    monkeypatch.setitem(sys.modules, "torch", object())
    assert start_method() == "spawn"
