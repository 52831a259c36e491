"""fileformats.sources: local paths, file:// URLs and http(s) downloads into the cache, against a
threaded HTTP server on 127.0.0.1 that counts the requests it gets."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from fileformats.errors import UserError
from fileformats.sources import cached_path, open_source

BODY = bytes(range(256)) * 40  # 10,240 bytes
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """/ok.pkl: the body; /short.pkl: a Content-Length 1000 bytes larger than what is sent;
    /slow.pkl: no answer for 1 s; anything else: 404."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path == "/slow.pkl":
            time.sleep(1.0)
        if self.path not in ("/ok.pkl", "/short.pkl", "/slow.pkl"):
            self.send_error(404, "Not Found")
            return
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY) + (1000 if self.path == "/short.pkl" else 0)))
            self.end_headers()
            self.wfile.write(BODY)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def _httpd():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(_httpd, monkeypatch):
    """The server with a fresh request log; proxies off so requests goes straight to 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    _httpd.requests = []
    return _httpd


def _cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file())


def test_download_then_served_from_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("REFINER_CACHE", str(tmp_path / "cache"))
    url = f"{server.url}/ok.pkl"
    path = open_source(url, sha256=BODY_SHA256)
    assert path.read_bytes() == BODY
    assert path == cached_path(url) and path.parent == tmp_path / "cache" / "downloads"
    assert path.name.endswith("_ok.pkl")
    assert server.requests == ["/ok.pkl"]
    assert open_source(url) == path and open_source(url, sha256=BODY_SHA256.upper()) == path
    assert server.requests == ["/ok.pkl"]  # no second request
    assert _cache_files(tmp_path / "cache") == [path]  # no temporary files left


def test_http_404(server, tmp_path):
    with pytest.raises(UserError, match=rf"HTTP 404 Not Found for {server.url}/missing.pkl"):
        open_source(f"{server.url}/missing.pkl", cache_dir=tmp_path)
    assert _cache_files(tmp_path) == []


def test_truncated_body_leaves_nothing(server, tmp_path):
    with pytest.raises(UserError, match="ended early") as info:
        open_source(f"{server.url}/short.pkl", cache_dir=tmp_path)
    assert "nothing was cached" in str(info.value)
    assert _cache_files(tmp_path) == []


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(UserError, match=f"expected sha256 {'0' * 64}, got {BODY_SHA256}"):
        open_source(f"{server.url}/ok.pkl", sha256="0" * 64, cache_dir=tmp_path)
    assert _cache_files(tmp_path) == []


def test_stale_cache_entry_is_fetched_again(server, tmp_path):
    url = f"{server.url}/ok.pkl"
    cached_path(url, tmp_path).parent.mkdir(parents=True)
    cached_path(url, tmp_path).write_bytes(b"partial junk")
    assert open_source(url, sha256=BODY_SHA256, cache_dir=tmp_path).read_bytes() == BODY
    assert server.requests == ["/ok.pkl"]


def test_timeout(server, tmp_path):
    with pytest.raises(UserError, match="timed out after 0.3 s"):
        open_source(f"{server.url}/slow.pkl", cache_dir=tmp_path, timeout=0.3)
    assert _cache_files(tmp_path) == []


def test_connection_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=f"could not connect to download http://127.0.0.1:{port}/x.pkl"):
        open_source(f"http://127.0.0.1:{port}/x.pkl", cache_dir=tmp_path, timeout=2)


def test_local_paths_and_file_urls(tmp_path):
    local = tmp_path / "net work.pkl"
    local.write_bytes(BODY)
    assert open_source(local) == local
    assert open_source(str(local), sha256=BODY_SHA256) == local
    assert open_source(local.as_uri()) == local  # file:///.../net%20work.pkl
    with pytest.raises(UserError, match="checksum mismatch"):
        open_source(local, sha256="1" * 64)
    with pytest.raises(UserError, match=f"file not found: {tmp_path / 'missing.pkl'}"):
        open_source(tmp_path / "missing.pkl")
    with pytest.raises(UserError, match="file not found"):
        open_source((tmp_path / "missing.pkl").as_uri())
    with pytest.raises(UserError, match="not a file"):
        open_source(tmp_path)
    with pytest.raises(UserError, match="unsupported URL scheme 'ftp://'"):
        open_source("ftp://example.com/a.pkl")
