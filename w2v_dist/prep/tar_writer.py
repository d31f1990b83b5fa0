"""Writing tar members fast: ``tarfile``'s exact bytes without its per-member overhead, and whole-file reads.

Sharding copies every input once, so per-file costs that a copy does not have decide its speed (see the
sharding section of docs/performance.md); this module holds the two that were worth taking out of ``tarfile``
and ``Path.read_bytes``.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path


def tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "w2v", "w2v"
    # GNU format: one header per member (pax adds a second one to write and to parse), still any key length.
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


_HEADER_TEMPLATE = tarfile_header("", 0)


def tar_header(name: str, size: int) -> bytes:
    """``tarfile``'s GNU header for one of our members, without tarfile's generic path: only the name, the
    size and the checksum differ between members, so a template is patched
    (``tests/unit/test_shard_format.py`` checks it byte for byte against ``TarInfo.tobuf``). Names that need
    more than the 100-byte field go the long way."""
    encoded = name.encode()
    if len(encoded) >= 100 or not name.isascii() or size >= 8**11:
        return tarfile_header(name, size)
    header = bytearray(_HEADER_TEMPLATE)
    header[:len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


class TarSink:
    """Writes tar members straight to a file, hashing on the way (the shard's sha256 without reading it
    back).

    The bytes are exactly what ``tarfile`` writes (headers from :func:`tar_header`); going around
    ``TarFile.addfile`` saves its per-member file object and chunked copy, which cost as much as the copy.
    """

    def __init__(self, out: io.BufferedWriter) -> None:
        self.out, self.sha256, self.offset = out, hashlib.sha256(), 0

    def add(self, name: str, data: bytes | memoryview) -> None:
        """One member as webdataset's ``TarWriter`` writes it (read-only, owner w2v, mtime 0:
        reproducible)."""
        self._write(tar_header(name, len(data)))
        self._write(data)
        self._write(bytes(-len(data) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record as ``TarFile.close`` does."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self.offset % tarfile.RECORDSIZE))

    def _write(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        self.out.write(data)
        self.offset += len(data)


class FileReader:
    """Reads whole files into one reused buffer: a fresh allocation per file would cost its page faults, as
    much as the copy itself. A view is valid until the next :meth:`read`."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def read(self, path: Path) -> memoryview:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if len(self.buffer) < size:
                self.buffer = bytearray(size)
            view = memoryview(self.buffer)[:size]
            filled = 0
            while filled < size and (count := os.preadv(fd, [view[filled:]], filled)):
                filled += count
        finally:
            os.close(fd)
        if filled != size:
            raise OSError(f"{path} changed while it was being read")
        return view
