"""fileformats.sources: local paths, file:// URLs and http(s) downloads into the cache, against a
fault-injecting threaded HTTP server on 127.0.0.1 that counts the requests it gets."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest

from common.errors import UserError
from fileformats.sources import cached_path, content_problem, open_source

BODY = pickle.dumps({"weights": bytes(range(256)) * 40, "name": "net"}, protocol=4)  # ~10 KiB pickle
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()
BIG = pickle.dumps(bytes(200_000), protocol=4)  # for the slow routes: never finishes in time
HTML = b"<!DOCTYPE html><html><body>Please sign in</body></html>"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Each path is one behaviour (see ROUTES). HTTP/1.0: the connection closes after each answer, so a
    body without Content-Length ends where the server stops sending. Every route ends by itself."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        route = ROUTES.get(self.path)
        try:
            if route is None:
                self.send_error(404, "Not Found")
            else:
                route(self)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    def send(self, body: bytes, length: int | None = -1, content_type: str = "application/octet-stream",
             status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(len(body) if length == -1 else length))
        self.end_headers()
        self.wfile.write(body)

    def trickle(self, body: bytes, piece: int, pause: float, pieces: int) -> None:
        """Headers with the full Content-Length, then `pieces` pieces of `piece` bytes, `pause` s apart."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(pieces):
            self.wfile.write(body[i * piece:(i + 1) * piece])
            self.wfile.flush()
            time.sleep(pause)

    def log_message(self, *args) -> None:
        pass


def _redirect(h: _Handler) -> None:
    h.send_response(302)
    h.send_header("Location", "/ok.pkl")
    h.send_header("Content-Length", "0")
    h.end_headers()


ROUTES = {
    "/ok.pkl": lambda h: h.send(BODY),
    "/nolength.pkl": lambda h: h.send(BODY, length=None),  # whole, ends at the close
    "/cut-nolength.pkl": lambda h: h.send(BODY[:len(BODY) // 2], length=None),  # cut short, no length
    "/short.pkl": lambda h: h.send(BODY, length=len(BODY) + 1000),  # promises more than it sends
    "/page.pkl": lambda h: h.send(HTML, content_type="text/html; charset=utf-8"),
    "/page-octet.pkl": lambda h: h.send(b"\n  " + HTML),  # a web page that claims to be a file
    "/error.pkl": lambda h: h.send(b"oops", content_type="text/plain", status=500),
    "/redirect.pkl": _redirect,
    "/slow-answer.pkl": lambda h: (time.sleep(1.0), h.send(BODY)),
    "/trickle.pkl": lambda h: h.trickle(BIG, 1024, 2.0, 2),  # 1 KiB every 2 s
    "/drip.pkl": lambda h: h.trickle(BIG, 1024, 0.05, 40),  # 20 KiB/s: data keeps coming, too little
    "/steady.pkl": lambda h: h.trickle(BIG, 8192, 0.02, 24),  # fast enough, but longer than allowed
    "/stall.pkl": lambda h: h.trickle(BIG, 4096, 3.0, 1),  # 4 KiB, then nothing
}


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


def test_whole_body_without_content_length_is_kept(server, tmp_path):
    assert open_source(f"{server.url}/nolength.pkl", cache_dir=tmp_path).read_bytes() == BODY


def test_redirect_is_followed_and_cached_under_the_given_url(server, tmp_path):
    url = f"{server.url}/redirect.pkl"
    path = open_source(url, sha256=BODY_SHA256, cache_dir=tmp_path)
    assert path == cached_path(url, tmp_path) and path.read_bytes() == BODY
    assert open_source(url, cache_dir=tmp_path) == path
    assert server.requests == ["/redirect.pkl", "/ok.pkl"]


@pytest.mark.parametrize("route, needle", [
    ("/missing.pkl", r"HTTP 404 Not Found for http://127\.0\.0\.1:\d+/missing\.pkl"),
    ("/error.pkl", r"HTTP 500 Internal Server Error for http://127\.0\.0\.1:\d+/error\.pkl"),
    ("/short.pkl", r"ended early after 10,\d+ of 11,\d+ bytes .*nothing was cached"),
    ("/cut-nolength.pkl", r"not usable: the pickle is incomplete or damaged .*nothing was cached"),
    ("/page.pkl", r"answers with a web page \(HTML\), not a model file"),
    ("/page-octet.pkl", r"not usable: it is a web page \(HTML\), not a model file"),
])
def test_bad_answers_leave_nothing(server, tmp_path, route, needle):
    with pytest.raises(UserError, match=needle) as info:
        open_source(f"{server.url}{route}", cache_dir=tmp_path)
    assert "\n" not in str(info.value) and "could not connect" not in str(info.value)
    assert _cache_files(tmp_path) == []


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(UserError, match=f"expected sha256 {'0' * 64}, got {BODY_SHA256}"):
        open_source(f"{server.url}/ok.pkl", sha256="0" * 64, cache_dir=tmp_path)
    assert _cache_files(tmp_path) == []


def test_damaged_or_stale_cache_entry_is_fetched_again(server, tmp_path):
    url = f"{server.url}/ok.pkl"
    cached_path(url, tmp_path).parent.mkdir(parents=True)
    cached_path(url, tmp_path).write_bytes(BODY[:-10])  # cut short by an older version
    assert open_source(url, cache_dir=tmp_path).read_bytes() == BODY
    cached_path(url, tmp_path).write_bytes(pickle.dumps("another file", protocol=4))
    assert open_source(url, sha256=BODY_SHA256, cache_dir=tmp_path).read_bytes() == BODY
    assert server.requests == ["/ok.pkl", "/ok.pkl"]


@pytest.mark.parametrize("route, timeouts, needle", [
    ("/slow-answer.pkl", dict(timeout=0.3), r"the server did not answer within 0\.3 s"),
    ("/trickle.pkl", dict(timeout=0.5), r"stalled: no data for 0\.5 s \(after 1,024 of 200,\d+ bytes\)"),
    ("/stall.pkl", dict(timeout=0.5), r"stalled: no data for 0\.5 s \(after 4,096 of 200,\d+ bytes\)"),
    ("/drip.pkl", dict(timeout=0.5), r"stalled: less than 64 KiB arrived in 0\.5 s"),
    ("/steady.pkl", dict(timeout=5, total_timeout=0.2), r"did not finish within 0\.2 s"),
])
def test_timeouts_leave_nothing(server, tmp_path, route, timeouts, needle):
    start = time.monotonic()
    with pytest.raises(UserError, match=needle) as info:
        open_source(f"{server.url}{route}", cache_dir=tmp_path, **timeouts)
    assert time.monotonic() - start < 1.5
    assert "could not connect" not in str(info.value)
    assert _cache_files(tmp_path) == []


def test_timeouts_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("REFINER_DOWNLOAD_STALL", "0.4")
    with pytest.raises(UserError, match=r"no data for 0\.4 s"):
        open_source(f"{server.url}/stall.pkl", cache_dir=tmp_path)
    monkeypatch.setenv("REFINER_DOWNLOAD_STALL", "nan")
    with pytest.raises(UserError, match=r"\$REFINER_DOWNLOAD_STALL='nan' is not a positive number"):
        open_source(f"{server.url}/ok.pkl", cache_dir=tmp_path)


def test_connection_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=f"could not connect to download http://127.0.0.1:{port}/x.pkl"):
        open_source(f"http://127.0.0.1:{port}/x.pkl", cache_dir=tmp_path, timeout=2)


def test_unwritable_cache_is_one_line(server, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=r"file, not a folder while writing .*/file/cache/downloads.*REFINER_CACHE"):
        open_source(f"{server.url}/ok.pkl", cache_dir=tmp_path / "file" / "cache")


def test_stale_temporary_files_in_the_cache_are_removed(server, tmp_path):
    url = f"{server.url}/ok.pkl"
    folder = cached_path(url, tmp_path).parent
    folder.mkdir(parents=True)
    old, fresh = folder / ".abc_net.pkl.k2j4h5g6.tmp", folder / ".abc_net.pkl.a1b2c3d4.tmp"
    for p in (old, fresh):
        p.write_bytes(b"partial")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    open_source(url, cache_dir=tmp_path)
    assert not old.exists() and fresh.exists()  # a live download's file is spared


def test_content_check_by_format():
    def problem(data: bytes, thorough: bool = True):
        return content_problem(io.BytesIO(data), thorough)

    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("a.txt", "x" * 1000)
    zipped = zipped.getvalue()
    packed = gzip.compress(b"y" * 1000)
    assert problem(BODY) is None and problem(zipped) is None and problem(packed) is None
    assert "pickle is incomplete" in problem(BODY[:-1])
    assert "does not end with STOP" in problem(BODY[:-1], thorough=False)
    assert "central directory" in problem(zipped[:-30])
    assert "gzip file is incomplete" in problem(packed[:-4])
    assert "gzip file is incomplete or damaged" in problem(packed[:12] + b"\xff" * 8 + packed[20:])
    assert "web page" in problem(b"  <html>")
    assert "empty" in problem(b"")
    assert "not a pickle, zip or gzip file" in problem(b"GIF89a....")


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
    with pytest.raises(UserError, match="not a file: .* is a folder"):
        open_source(tmp_path)
    for value, message in [(b"/a.pkl", "not a bytes"), (None, "not a NoneType"), (3, "not a int"),
                           ("", r"no file given \(an empty path\)")]:
        with pytest.raises(UserError, match=message):
            open_source(value)
    with pytest.raises(UserError, match="unsupported URL scheme 'ftp://'"):
        open_source("ftp://example.com/a.pkl")
