"""Hub models on offline compute nodes (:mod:`w2v_dist.hub`): the cache is used without the hub, an
unreachable hub is one line within seconds, and ``w2v-dist fetch-model`` prints the snapshot it leaves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from tests.support.data import hub_cache
from tests.support.launch import free_port
from w2v_dist.cli import main
from w2v_dist.hub import ModelUnavailable, fetch, is_hub_id

REPO_ID = "w2v-dist-test/tiny"


@pytest.fixture
def model_files(tmp_path: Path) -> Path:
    files = tmp_path / "files"
    files.mkdir()
    (files / "config.json").write_text('{"model_type": "wav2vec2"}')
    return files


@pytest.fixture
def unreachable(monkeypatch: pytest.MonkeyPatch) -> str:
    """A hub endpoint nothing listens on (as HF_ENDPOINT=http://127.0.0.1:PORT would give)."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return endpoint


def test_offline_a_cached_model_is_its_snapshot(tmp_path: Path, model_files: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = hub_cache(tmp_path / "home", REPO_ID, model_files)
    assert fetch(REPO_ID, tmp_path / "home" / "hub") == snapshot
    with pytest.raises(ModelUnavailable,
                       match=r"w2v-dist-test/other is not in the hub cache .*HF_HUB_OFFLINE=1"):
        fetch("w2v-dist-test/other", tmp_path / "home" / "hub")


def test_an_unreachable_hub_is_one_line_within_seconds(tmp_path: Path, unreachable: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as caught:
        fetch("facebook/wav2vec2-base", tmp_path / "home" / "hub")
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert "\n" not in message and "facebook/wav2vec2-base" in message and unreachable in message
    assert "HF_HUB_OFFLINE=1" in message and f"HF_HOME={tmp_path / 'home'}" in message


def test_an_unreachable_hub_falls_back_to_the_cache(tmp_path: Path, model_files: Path, unreachable: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    snapshot = hub_cache(tmp_path / "home", REPO_ID, model_files)
    assert fetch(REPO_ID, tmp_path / "home" / "hub") == snapshot
    assert "is unreachable" in caplog.text and "using the cached w2v-dist-test/tiny" in caplog.text


def test_fetch_model_prints_the_snapshot_and_what_nodes_need(tmp_path: Path, model_files: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_HOME", raising=False)
    snapshot = hub_cache(tmp_path / "cache", REPO_ID, model_files)
    assert main(["fetch-model", REPO_ID, "--cache", str(tmp_path / "cache")]) == 0
    out, err = capsys.readouterr()
    assert f"{snapshot}\n" in out + err and f"HF_HOME={tmp_path / 'cache'} HF_HUB_OFFLINE=1" in err
    assert main(["fetch-model", "w2v-dist-test/other", "--cache", str(tmp_path / "cache")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_hub_ids_and_local_paths(tmp_path: Path) -> None:
    assert is_hub_id("facebook/wav2vec2-base") and is_hub_id("wav2vec2-base")
    assert (not is_hub_id(str(tmp_path)) and not is_hub_id("work/demo/model-init")
            and not is_hub_id("./model"))


def test_a_hub_that_accepts_but_never_answers_is_one_line_within_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A firewalled or hung hub (the connection opens, no reply comes): the probe gives up after
    HF_HUB_ETAG_TIMEOUT; huggingface_hub's own repo look-up has no timeout and would wait forever."""
    import socket
    import threading

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nothing ever reads or replies
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
        raised: list[BaseException] = []

        def attempt() -> None:
            try:
                fetch("facebook/wav2vec2-base", tmp_path / "hub")
            except BaseException as err:  # noqa: BLE001 (reported below)
                raised.append(err)

        worker = threading.Thread(target=attempt, daemon=True)
        start = time.monotonic()
        worker.start()
        worker.join(15)
        assert not worker.is_alive(), "fetch still waits for a hub that never answers"
    assert (time.monotonic() - start < 5 and len(raised) == 1
            and isinstance(raised[0], ModelUnavailable)), raised
    assert "ReadTimeout" in str(raised[0]) and "\n" not in str(raised[0])


def test_only_local_rank_0_asks_the_hub_the_others_take_its_snapshot(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """resolve() on a rank other than local rank 0 never fetches: it takes the path its node's local rank 0
    put in the gather. A problem on any node stops every rank, said by global rank 0 only."""
    import socket

    from w2v_dist import dist, hub

    def no_fetch(*_: object) -> Path:
        raise AssertionError("a rank other than local rank 0 asked the hub")

    host = socket.gethostname()
    monkeypatch.setattr(hub, "fetch", no_fetch)
    views = [(host, 0, str(tmp_path), ""), (host, 1, None, "")]
    monkeypatch.setattr(dist, "all_gather_objects", lambda mine: views)
    assert hub.resolve(REPO_ID, local_rank=1, is_main=False) == str(tmp_path)
    views[0] = (host, 0, None, "model x: the hub is unreachable")
    with pytest.raises(ModelUnavailable) as quiet:
        hub.resolve(REPO_ID, local_rank=1, is_main=False)
    assert str(quiet.value) == ""
    with pytest.raises(ModelUnavailable, match="the hub is unreachable"):
        hub.resolve(REPO_ID, local_rank=1, is_main=True)


def test_a_model_the_hub_does_not_have_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped id or a missing local directory (``runs/x/final``) that the hub answers 404 for."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None: ...

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(ModelUnavailable) as caught:
            fetch("runs/final", tmp_path / "hub")
    finally:
        server.shutdown()
    message = str(caught.value)
    assert (message.startswith("model runs/final is no local directory, and the hub says: ")
            and "\n" not in message)
    assert "HF_TOKEN" in message
