"""Models from the Hugging Face Hub on clusters whose compute nodes may have no network:
``w2v-dist fetch-model`` fills a cache on a login node, and a run asks the hub once per node (local rank 0),
then every rank loads the same local snapshot.

Left to transformers, every rank of every node asked the hub for each file of the model, and an unreachable
hub cost each of them about four minutes of retried HEAD requests (five retries per file, with backoff)
before a traceback. Here the hub is asked once, with one request bounded by ``HF_HUB_ETAG_TIMEOUT`` (10 s by
default) and no retries; when it does not answer, the cache is used if it holds the model, and otherwise the
run stops with one line that names the model, ``HF_HUB_OFFLINE`` and ``HF_HOME``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

log = logging.getLogger("w2v_dist.hub")

IGNORED = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "flax_model*", "tf_model*",
           "rust_model*", "coreml/*", "onnx/*", "openvino/*", "*.md", ".gitattributes"]
"""What a fine-tuning start never reads (other frameworks' weights, docs): not downloaded."""
REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class ModelUnavailable(RuntimeError):
    """The model cannot be read on this node: not in the cache and the hub out of reach, or not on the hub.
    An empty message: another rank reports it (one line per run, not one per rank)."""


def is_hub_id(name_or_path: str) -> bool:
    """``org/name`` or ``name`` that is not a local path: a model on the hub."""
    return (not Path(name_or_path).exists() and bool(REPO_ID.match(name_or_path))
            and not name_or_path.startswith("."))


def cache_home() -> str:
    """Where the hub cache lives (``HF_HOME``, or its default), for messages."""
    from huggingface_hub import constants

    return os.environ.get("HF_HOME", constants.HF_HOME)


def fetch(name: str, cache_dir: str | Path | None = None) -> Path:
    """The local snapshot of hub model ``name``, downloaded or updated when the hub answers. ``cache_dir``:
    the hub cache (default ``$HF_HOME/hub``). Raises :class:`ModelUnavailable` (one line) when it cannot be
    had."""
    import httpx2
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = str(cache_dir) if cache_dir is not None else None
    if constants.HF_HUB_OFFLINE:
        try:
            return Path(snapshot_download(name, cache_dir=cache, ignore_patterns=IGNORED,
                                          local_files_only=True))
        except LocalEntryNotFoundError:
            raise ModelUnavailable(
                f"model {name} is not in the hub cache under HF_HOME={cache_home()} and HF_HUB_OFFLINE=1 "
                f"forbids downloading it: run 'w2v-dist fetch-model {name} --cache DIR' where the hub is "
                f"reachable and set HF_HOME=DIR on every node") from None
    try:  # one bounded request, no retries: the hub answers within seconds or not at all
        HfApi().repo_info(name, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else 500
        if status < 500:  # not found, gated, no token: the cache would not help
            raise ModelUnavailable(f"model {name} is no local directory, and the hub says: "
                                   f"{str(err).splitlines()[0]} (a private or gated model needs "
                                   f"HF_TOKEN)") from None
        unreachable: Exception = err  # the hub is down
    except (httpx2.TransportError, OSError) as err:
        unreachable = err
    else:
        return Path(snapshot_download(name, cache_dir=cache, ignore_patterns=IGNORED))
    try:
        path = Path(snapshot_download(name, cache_dir=cache, ignore_patterns=IGNORED, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelUnavailable(
            f"model {name}: the hub ({constants.ENDPOINT}) is unreachable from {socket.gethostname()} "
            f"({type(unreachable).__name__}: "
            f"{str(unreachable).splitlines()[0] if str(unreachable) else ''}) and the model is not in the "
            f"cache under HF_HOME={cache_home()}. Run 'w2v-dist fetch-model {name} --cache DIR' where the "
            f"hub is reachable, then set HF_HOME=DIR and HF_HUB_OFFLINE=1 on every node") from None
    log.warning("the hub (%s) is unreachable (%s); using the cached %s (set HF_HUB_OFFLINE=1 to skip the "
                "check)",
                constants.ENDPOINT, type(unreachable).__name__, name)
    return path


_fetched: dict[str, str] = {}
"""What :func:`prefetch` found in this process, by hub id."""


def prefetch(name_or_path: str, local_rank: int) -> None:
    """Local rank 0 fetches a hub model before the process group exists: an unreachable hub then stops the
    run in seconds (the launcher ends the node's other ranks), before DeepSpeed starts. Raises
    :class:`ModelUnavailable`."""
    if local_rank == 0 and is_hub_id(name_or_path):
        _fetched[name_or_path] = str(fetch(name_or_path))


def resolve(name_or_path: str, local_rank: int, is_main: bool) -> str:
    """Collective: the local directory every rank loads ``name_or_path`` from. A hub model is fetched by
    local rank 0 of each node (:func:`fetch`, unless :func:`prefetch` did) while the others wait in the
    gather; each rank then takes its node's snapshot, so the ranks of a node load the same files. A failure
    anywhere stops every rank: global rank 0 says why in one line, the others stop without a word."""
    from w2v_dist import dist

    if not is_hub_id(name_or_path):
        return name_or_path
    found: str | None = _fetched.get(name_or_path)
    problem = ""
    if local_rank == 0 and found is None:
        try:
            found = str(fetch(name_or_path))
        except ModelUnavailable as err:
            problem = str(err)
    views = dist.all_gather_objects((socket.gethostname(), local_rank, found, problem))
    problems = [p for *_, p in views if p]
    if problems:
        raise ModelUnavailable(problems[0] if is_main else "")
    host = socket.gethostname()
    mine = [path for h, rank, path, _ in views if h == host and rank == 0 and path and Path(path).is_dir()]
    if not mine:
        raise ModelUnavailable(f"model {name_or_path}: no rank 0 on {host} fetched it")
    return mine[0]
