"""Fetching LibriSpeech archives (openslr or a mirror): resumable download, MD5 check, then a safe
extraction.

Order matters: the archive's MD5 is checked *before* anything is extracted, every member is checked before it
is written, and extraction goes to a staging directory that is renamed into place only when the whole archive
passed. A bad or hostile archive therefore leaves nothing behind. ``LibriSpeech/<subset>/.complete`` travels
inside the renamed directory, so its presence means a finished extraction and a rerun is a no-op.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

DEFAULT_MIRROR = "https://www.openslr.org/resources/12"
MARKER = ".complete"
_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")
_BYTES_BAR = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "disable": None}


@dataclass(frozen=True)
class Subset:
    md5: str
    """From openslr's ``resources/12/md5sum.txt``."""
    gigabytes: float
    """Approximate archive size (for the disk-space warning and the docs)."""
    hours: float
    utterances: int


SUBSETS: dict[str, Subset] = {
    "dev-clean": Subset("42e2234ba48799c1f50f24a7926300a1", 0.337, 5.4, 2_703),
    "dev-other": Subset("c8d0bcc9cca99d4f8b62fcc847357931", 0.314, 5.3, 2_864),
    "test-clean": Subset("32fa31d27d2e1cad72775fee3f4849a9", 0.346, 5.4, 2_620),
    "test-other": Subset("fb5a50374b501bb3bac4815ee91d3135", 0.328, 5.4, 2_939),
    "train-clean-100": Subset("2a93770f6d5c6c964bc36631d331a522", 6.3, 100.6, 28_539),
    "train-clean-360": Subset("c0e676e450a7ff2f54aeade5171606fa", 23.0, 363.6, 104_014),
    "train-other-500": Subset("d1a0fd59409feb2c614ce4d30c387708", 30.0, 496.7, 148_688),
}


class DownloadError(RuntimeError):
    """A download or extraction that cannot go on; the message says what happened and what to do."""


def read_checksums(path: str | Path) -> dict[str, str]:
    """``{file name: md5}`` from an ``md5sum``-style file (``<md5>  <name>``, ``*<name>`` for binary
    mode)."""
    sums: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if not _MD5.match(digest) or not name:
            raise DownloadError(f"{path}:{number}: expected '<md5>  <file name>', got {line!r}")
        sums[PurePosixPath(name).name] = digest.lower()
    return sums


def md5_of(path: Path) -> str:
    # MD5 because it is the only checksum openslr publishes: it catches corruption, not a malicious mirror.
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream, tqdm(total=path.stat().st_size, desc=f"md5 {path.name}",
                                          **_BYTES_BAR) as bar:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _fetch_once(url: str, partial: Path, log: Callable[[str], None]) -> bool:
    """One HTTP request appending to ``partial``; ``False`` when the connection ended early."""
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "w2v-dist"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            # nothing left past our size: the partial is complete (the MD5 will tell)
            return True
        raise
    with response:
        if have and response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != have:
                raise DownloadError(f"{url}: asked for bytes from {have}, the server answered "
                                    f"{response.headers.get('Content-Range')!r}; delete {partial} and rerun")
            mode = "ab"
            log(f"resuming {partial.name} from {have / 1e6:.1f} MB")
        else:
            if have:  # a 200 to a Range request is the whole file again, so appending would corrupt it
                log(f"the server ignored the resume request; downloading {partial.name} from the start")
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        got = have
        with open(partial, mode) as out, tqdm(total=total, initial=have, desc=partial.name,
                                              **_BYTES_BAR) as bar:
            # read() returns b"" when the server closes early (it does not raise), hence the length check
            # below
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    return total is None or got >= total


def fetch(url: str, partial: Path, retries: int = 3, backoff: float = 2.0,
          log: Callable[[str], None] = print) -> None:
    """Download ``url`` into ``partial``, resuming from what it holds; retry dropped connections
    (resuming)."""
    problem = ""
    for attempt in range(retries + 1):
        try:
            if _fetch_once(url, partial, log):
                return
            problem = "the connection closed before the end of the file"
        except urllib.error.HTTPError as err:
            if err.code < 500:  # 404 & co will not get better by retrying
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
            problem = f"HTTP {err.code} {err.reason}"
        except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets, bad status lines
            problem = str(err) or type(err).__name__
        if attempt < retries:
            log(f"{url}: {problem}; retrying ({attempt + 1}/{retries})")
            time.sleep(backoff * 2**attempt)
    kept = partial.stat().st_size if partial.exists() else 0
    raise DownloadError(f"{url}: {problem}; {partial} keeps {kept} bytes: rerun the same command to resume")


def _member_problem(member: tarfile.TarInfo, subset: str, staging: Path) -> str:
    """Why ``member`` must not be extracted ('' when it may). Stricter than ``filter='data'`` on purpose."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith(("/", "\\")):
        # the data filter would silently strip the '/'; an archive with one is not LibriSpeech
        return "absolute path"
    if ".." in path.parts:
        return "'..' in the path"
    if member.issym() or member.islnk():
        return f"link to {member.linkname!r} (LibriSpeech archives hold no links)"
    if not (member.isfile() or member.isdir()):
        return "device, FIFO or other special file"
    if not path.parts or path.parts[0] != "LibriSpeech" or (len(path.parts) > 2 and path.parts[1] != subset):
        return f"outside LibriSpeech/{subset}/"
    try:
        tarfile.data_filter(member, str(staging))  # the standard library's checks as a second opinion
    except tarfile.FilterError as err:
        return str(err)
    return ""


def extract_archive(archive: Path, root: Path, subset: str, marker: dict[str, object]) -> Path:
    """Extract ``LibriSpeech/<subset>`` of ``archive`` under ``root`` (all or nothing); return the subset
    dir."""
    if not hasattr(tarfile, "data_filter"):
        raise DownloadError("safe extraction needs Python >= 3.11.4 (tarfile extraction filters)")
    staging = root / f".{subset}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    target = root / "LibriSpeech" / subset
    files = 0
    try:
        # Stream mode: one pass over the gzip (30 GB for train-other-500); each member is checked before
        # writing.
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                problem = _member_problem(member, subset, staging)
                if problem:
                    raise DownloadError(f"{archive.name}: refusing member {member.name!r}: {problem}; "
                                        "nothing was extracted")
                if member.isfile():
                    # directories come from the files' parents, so a read-only dir mode cannot bite
                    tar.extract(member, staging, filter="data")
                    files += 1
        staged = staging / "LibriSpeech" / subset
        if not staged.is_dir():
            raise DownloadError(f"{archive.name} holds no LibriSpeech/{subset}/ directory; nothing was "
                                f"extracted")
        (staged / MARKER).write_text(json.dumps({**marker, "files": files}, indent=1) + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        for extra in (staging / "LibriSpeech").iterdir():
            # README/SPEAKERS/... are the same in every archive
            if extra.name != subset and not (target.parent / extra.name).exists():
                extra.rename(target.parent / extra.name)
        staged.rename(target)
    except (tarfile.TarError, EOFError, zlib.error) as err:
        raise DownloadError(f"{archive.name} is not a readable tar.gz ({err}); nothing was "
                            f"extracted") from None
    except OSError as err:  # a full disk, most likely; the staging directory goes, the archive stays
        raise DownloadError(f"extracting {archive.name} failed ({err}); nothing was extracted") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def download_subset(subset: str, root: str | Path, mirror: str = DEFAULT_MIRROR,
                    checksums: dict[str, str] | None = None, keep_archive: bool = False, retries: int = 3,
                    backoff: float = 2.0, log: Callable[[str], None] = print) -> Path:
    """Download, check and extract one subset to ``root/LibriSpeech/<subset>``; a no-op when already done."""
    if not _SAFE_NAME.match(subset) or ".." in subset:
        raise DownloadError(f"refusing subset name {subset!r}: it must be a plain name like 'dev-clean'")
    base = Path(root)
    target = base / "LibriSpeech" / subset
    if (target / MARKER).is_file():
        log(f"{subset}: already complete in {target}, nothing to do")
        return target
    name, known = f"{subset}.tar.gz", SUBSETS.get(subset)
    expected = (checksums or {}).get(name) or (known.md5 if known else None)
    if expected is None:
        raise DownloadError(f"unknown subset {subset!r} (known: {', '.join(SUBSETS)}); "
                            f"give its MD5 with --checksums FILE")
    if target.exists():
        raise DownloadError(f"{target} exists without a {MARKER} marker (not written by this tool, or "
                            f"damaged): move it away and rerun")
    base.mkdir(parents=True, exist_ok=True)
    archive, partial = base / name, base / f"{name}.partial"
    if archive.is_file():
        # an earlier run verified it but did not finish extracting, or the user put it there
        log(f"{subset}: using the existing {archive}")
        if (got := md5_of(archive)) != expected:
            raise DownloadError(f"{archive}: MD5 {got} does not match the expected {expected}; nothing was "
                                "extracted. Delete it and rerun to download it again")
    else:
        url = f"{mirror.rstrip('/')}/{name}"
        log(f"{subset}: downloading {url}{f' (about {known.gigabytes:g} GB)' if known else ''} to {partial}")
        if known:
            # FLAC is already compressed: the extracted tree is about as large as the archive, so budget
            # twice that.
            need = 2 * known.gigabytes * 1e9 - (partial.stat().st_size if partial.exists() else 0)
            if (free := shutil.disk_usage(base).free) < need:
                log(f"warning: {subset} needs about {need / 1e9:.1f} GB free under {base}, only "
                    f"{free / 1e9:.1f} GB is")
        fetch(url, partial, retries, backoff, log)
        if (got := md5_of(partial)) != expected:
            # resuming a corrupt file would only repeat the mismatch, so start clean next time
            partial.unlink()
            raise DownloadError(f"{name}: MD5 {got} does not match the expected {expected}; deleted the "
                                f"download and extracted nothing. Rerun to download it again (or check "
                                f"--mirror/--checksums)")
        partial.rename(archive)
    log(f"{subset}: MD5 ok, extracting")
    extract_archive(archive, base, subset, {"subset": subset, "archive": name, "md5": expected})
    if not keep_archive:
        archive.unlink()
    log(f"{subset}: ready in {target}")
    return target


def download(subsets: list[str], root: str | Path, mirror: str | None = None,
             checksums_file: str | None = None,
             keep_archive: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """:func:`download_subset` for each subset, in order (``mirror`` None: openslr); stops at the first
    failure."""
    checksums = read_checksums(checksums_file) if checksums_file else None
    return [download_subset(s, root, mirror or DEFAULT_MIRROR, checksums, keep_archive, log=log)
            for s in subsets]
