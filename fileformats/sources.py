"""Turn a user's source string (local path, file:// URL, http(s) URL) into a local file path.

URLs are downloaded once into a cache folder (`$REFINER_CACHE`, default `~/.cache/refiner`) under
`downloads/<sha256(url)[:16]>_<file name>`, the way dnnlib.util.open_url caches NVIDIA's pretrained
pickles (NVlabs/stylegan2-ada-pytorch dnnlib/util.py). The body is streamed to a temporary file and kept
only when it is complete and is what a model file can be:

- its length equals the Content-Length when the server sends one;
- it is a pickle, a zip archive (torch.save, TorchScript, .npz) or a gzip file, never a web page, and it is
  whole by that format's own structure (the pickle reaches its STOP opcode, the zip has its central
  directory, the gzip stream its end), which catches a body cut short without a Content-Length;
- its sha256 matches, when one is given.

A download fails (nothing is kept) when no progress is made for a while (`stall`: less than
MIN_PROGRESS bytes in that many seconds, $REFINER_DOWNLOAD_STALL, default 60 s) or when it takes longer
than `total` seconds ($REFINER_DOWNLOAD_TIMEOUT, default 4 hours). A later call for the same URL returns
the cached file without any network request.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pickletools
import re
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from common.errors import UserError
from fileformats.atomic import atomic_open, remove_stale_temps
from fileformats.progress import Progress

DEFAULT_TIMEOUT = 60.0  # seconds to connect, to get an answer, and without progress while receiving
DEFAULT_TOTAL_TIMEOUT = 4 * 3600.0  # seconds for a whole download
MIN_PROGRESS = 64 << 10  # bytes that must arrive within every `stall` seconds
CACHE_ADVICE = "set REFINER_CACHE to another folder"
STALE_TEMP_AGE = 600.0  # a temporary file in the cache untouched this long belongs to a killed process
_CHUNK = 1 << 20
# The pickle that starts a legacy (non-zip) torch.save file: the magic number 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e"


@dataclass(frozen=True)
class Timeouts:
    """How long a download may go without progress (`stall`) and in all (`total`), in seconds."""

    stall: float = DEFAULT_TIMEOUT
    total: float = DEFAULT_TOTAL_TIMEOUT

    @classmethod
    def from_env(cls, stall: float | None = None, total: float | None = None) -> Timeouts:
        """The given values, else $REFINER_DOWNLOAD_STALL / $REFINER_DOWNLOAD_TIMEOUT, else the defaults."""
        return cls(stall if stall is not None else _env_seconds("REFINER_DOWNLOAD_STALL", DEFAULT_TIMEOUT),
                   total if total is not None else _env_seconds("REFINER_DOWNLOAD_TIMEOUT", DEFAULT_TOTAL_TIMEOUT))


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise UserError(f"${name}={text!r} is not a positive number of seconds; fix or unset it")
    return value


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else $REFINER_CACHE, else ~/.cache/refiner."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("REFINER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "refiner"


def cached_path(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `url` is (or will be) cached: a hash of the whole URL keeps different URLs apart, the
    sanitised last path segment keeps the name readable."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    name = Path(unquote(urlparse(url).path)).name or "download"
    safe = re.sub(r"[^0-9A-Za-z._-]", "_", name)[:128]
    return cache_root(cache_dir) / "downloads" / f"{digest}_{safe}"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256_text(text: str | None, option: str = "--sha256") -> str | None:
    """A sha256 given by the user: 64 hex digits (either case), returned in lower case."""
    if text is None:
        return None
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", text.strip()):
        raise UserError(f"{option} {text!r} is not a sha256: give its 64 hexadecimal digits")
    return text.strip().lower()


def _check_sha256(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual.lower() != expected.lower():
        raise UserError(f"checksum mismatch for {what}: expected sha256 {expected.lower()}, got {actual} "
                        "(wrong or corrupted file; nothing was kept)")


def is_url(text: str | os.PathLike) -> bool:
    return "://" in os.fspath(text)


def open_source(src: str | os.PathLike, sha256: str | None = None,
                cache_dir: str | os.PathLike | None = None, timeout: float | None = None,
                total_timeout: float | None = None) -> Path:
    """A local path for `src`: a path or file:// URL as it is, an http(s) URL via the cache.
    `sha256` (hex), if given, is checked for every kind of source. `timeout` (no progress) and
    `total_timeout` default to the environment's values (see Timeouts)."""
    if not isinstance(src, (str, os.PathLike)) or isinstance(os.fspath(src), bytes):
        raise UserError(f"a file is named by a path or URL (str or pathlib.Path), not a {type(src).__name__}")
    text = os.fspath(src)
    if not text:
        raise UserError("no file given (an empty path)")
    scheme = urlparse(text).scheme.lower() if is_url(text) else ""
    if scheme in ("http", "https"):
        return _download(text, sha256, cached_path(text, cache_dir), Timeouts.from_env(timeout, total_timeout))
    if scheme == "file":
        parsed = urlparse(text)
        path = Path(url2pathname(unquote(parsed.path)))
    elif scheme:
        raise UserError(f"unsupported URL scheme '{scheme}://' in {text}; give a local path, a file:// "
                        "or an http(s):// URL")
    else:
        path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"file not found: {path} (check the path)")
    if not path.is_file():
        raise UserError(f"not a file: {path} is a folder (give the path of a file)")
    if sha256 is not None:
        _check_sha256(file_sha256(path), sha256, str(path))
    return path


def _download(url: str, sha256: str | None, dest: Path, timeouts: Timeouts) -> Path:
    if dest.is_file():
        with open(dest, "rb") as f:
            complete = content_problem(f, thorough=False) is None
        if complete and (sha256 is None or file_sha256(dest) == sha256.lower()):
            return dest
        dest.unlink()  # a damaged, stale or foreign cache entry: fetch it again
    remove_stale_temps(dest.parent, older_than=STALE_TEMP_AGE)
    import requests  # only needed for URLs

    started = time.monotonic()
    try:
        response = requests.get(url, stream=True, timeout=timeouts.stall, headers={"Accept-Encoding": "identity"})
    except requests.ConnectTimeout:
        raise UserError(f"could not connect to download {url} within {timeouts.stall:g} s; check the URL and "
                        "the network (or raise REFINER_DOWNLOAD_STALL)") from None
    except requests.Timeout:
        raise UserError(f"the server did not answer within {timeouts.stall:g} s: {url} (try again later, or "
                        "raise REFINER_DOWNLOAD_STALL)") from None
    except requests.ConnectionError as e:
        raise UserError(f"could not connect to download {url} ({_reason(e)}); check the URL and "
                        "the network") from None
    except requests.RequestException as e:
        raise UserError(f"download failed for {url}: {_reason(e)}") from None
    with response:
        if response.status_code >= 400:
            raise UserError(f"download failed: HTTP {response.status_code} "
                            f"{response.reason or ''} for {url}".replace("  ", " "))
        if response.headers.get("Content-Type", "").lower().startswith(("text/html", "application/xhtml")):
            raise UserError(_html_message(url))
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        with atomic_open(dest, "w+b", advice=CACHE_ADVICE) as f:
            digest = _receive(response.raw, f, url, expected, timeouts, started, dest.name[17:])
            if expected is not None and response.raw.tell() != expected:
                raise UserError(f"download of {url} ended early: got {response.raw.tell()} of {expected} bytes "
                                "(connection dropped?); nothing was cached, try again")
            problem = content_problem(f, thorough=True)
            if problem is not None:
                raise UserError(f"download of {url} is not usable: {problem}; nothing was cached")
            _check_sha256(digest, sha256, url)
    return dest


def _receive(raw, f: IO[bytes], url: str, expected: int | None, timeouts: Timeouts, started: float,
             desc: str) -> str:
    """Copy the body from `raw` (a urllib3 response) to `f`; returns its sha256. Fails without progress
    (less than MIN_PROGRESS bytes in `stall` seconds) or when the whole download takes over `total`."""
    digest = hashlib.sha256()
    received = 0
    mark_time, mark_bytes = time.monotonic(), 0
    with Progress(expected, desc=desc, unit="B") as bar:
        while True:
            chunk = _read(raw, url, received, expected, timeouts.stall)
            if not chunk:
                return digest.hexdigest()
            f.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
            now = time.monotonic()
            if received - mark_bytes >= MIN_PROGRESS:
                mark_time, mark_bytes = now, received
            elif now - mark_time > timeouts.stall:
                raise UserError(f"download of {url} stalled: less than {MIN_PROGRESS >> 10} KiB arrived in "
                                f"{timeouts.stall:g} s (after {_amount(received, expected)}); nothing was cached. "
                                "Try again later, or raise REFINER_DOWNLOAD_STALL (seconds)")
            if now - started > timeouts.total:
                raise UserError(f"download of {url} did not finish within {timeouts.total:g} s (got "
                                f"{_amount(received, expected)}); nothing was cached. Try again, or raise "
                                "REFINER_DOWNLOAD_TIMEOUT (seconds)")


def _read(raw, url: str, received: int, expected: int | None, stall: float) -> bytes:
    """The next bytes of the body (b'' at its end); a network failure is a UserError saying what happened."""
    from urllib3.exceptions import HTTPError, ReadTimeoutError

    try:
        return raw.read1(_CHUNK)
    except (ReadTimeoutError, TimeoutError):
        raise UserError(f"download of {url} stalled: no data for {stall:g} s (after "
                        f"{_amount(received, expected)}); nothing was cached. Try again later, or raise "
                        "REFINER_DOWNLOAD_STALL (seconds)") from None
    except (HTTPError, http.client.HTTPException, OSError) as e:
        raise UserError(f"download of {url} ended early after {_amount(received, expected)} ({_reason(e)}); "
                        "nothing was cached, try again") from None


def content_problem(f: IO[bytes], thorough: bool = True) -> str | None:
    """What is wrong with a downloaded file, or None when it is a whole pickle, zip or gzip file.

    A pickle must reach its STOP opcode (thorough: by walking its opcodes with pickletools, nothing is
    built; else: its last byte is STOP), a zip must have its central directory, a gzip stream its end
    (thorough only). A legacy torch.save file (pickles followed by raw tensor data) is checked up to its data.
    """
    f.seek(0)
    head = f.read(64)
    if not head:
        return "the file is empty"
    if head.lstrip()[:1] == b"<":
        return "it is a web page (HTML), not a model file: the link may lead to a login or download page; " \
               "give the direct link of the file"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            zipfile.ZipFile(f).close()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "the zip archive is incomplete (its central directory is missing)"
        return None
    if head.startswith(b"\x1f\x8b"):
        if thorough:
            f.seek(0)
            try:
                with gzip.GzipFile(fileobj=f) as g:
                    while g.read(_CHUNK):
                        pass
            except (EOFError, OSError, zlib.error) as e:
                return f"the gzip file is incomplete or damaged ({e})"
        return None
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        if head.startswith(_LEGACY_TORCH):
            return _pickle_problem(f, count=5) if thorough else None
        if thorough:
            return _pickle_problem(f, count=1)
        f.seek(-1, os.SEEK_END)
        return None if f.read(1) == b"." else "the pickle is incomplete (it does not end with STOP)"
    return f"it is not a pickle, zip or gzip file (it starts with {head[:8]!r})"


def _pickle_problem(f: IO[bytes], count: int) -> str | None:
    """None when `count` whole pickles follow each other from the start of `f`."""
    f.seek(0)
    try:
        for _ in range(count):
            for op, _arg, _pos in pickletools.genops(f):
                if op.name == "STOP":
                    break
    except ValueError as e:
        return f"the pickle is incomplete or damaged ({e})"
    return None


def _amount(received: int, expected: int | None) -> str:
    return f"{received:,} of {expected:,} bytes" if expected is not None else f"{received:,} bytes"


def _html_message(url: str) -> str:
    return (f"{url} answers with a web page (HTML), not a model file: the link may lead to a login or "
            "download page; give the direct link of the file")


def _reason(error: Exception) -> str:
    """The innermost message of a requests/urllib3 exception chain, on one line."""
    while error.args and isinstance(error.args[0], Exception):
        error = error.args[0]
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]
