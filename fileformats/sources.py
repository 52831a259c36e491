"""Turn a user's source string (local path, file:// URL, http(s) URL) into a local file path.

URLs are downloaded once into a cache folder (`$REFINER_CACHE`, default `~/.cache/refiner`) under
`downloads/<sha256(url)[:16]>_<file name>`, the way dnnlib.util.open_url caches NVIDIA's pretrained
pickles (research/pickle_formats.md §4.1): streamed to a temporary file, checked against the
Content-Length and an optional sha256, then renamed into place, so the cache never holds a partial
file. A later call for the same URL returns the cached file without any network request.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from fileformats.atomic import atomic_open
from fileformats.errors import UserError
from fileformats.progress import Progress

DEFAULT_TIMEOUT = 60.0  # seconds to connect, and between two received chunks
_CHUNK = 1 << 20


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


def _check_sha256(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual.lower() != expected.lower():
        raise UserError(f"checksum mismatch for {what}: expected sha256 {expected.lower()}, got {actual} "
                        "(wrong or corrupted file; nothing was kept)")


def open_source(src: str | os.PathLike, sha256: str | None = None,
                cache_dir: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """A local path for `src`: a path or file:// URL as it is, an http(s) URL via the cache.
    `sha256` (hex), if given, is checked for every kind of source."""
    text = os.fspath(src)
    scheme = urlparse(text).scheme.lower() if "://" in text else ""
    if scheme in ("http", "https"):
        return _download(text, sha256, cached_path(text, cache_dir), timeout)
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
        raise UserError(f"not a file: {path} (give the path of a file)")
    if sha256 is not None:
        _check_sha256(file_sha256(path), sha256, str(path))
    return path


def _download(url: str, sha256: str | None, dest: Path, timeout: float) -> Path:
    if dest.is_file():
        if sha256 is None:
            return dest
        if file_sha256(dest).lower() == sha256.lower():
            return dest
        dest.unlink()  # a stale or foreign cache entry: fetch it again
    import requests  # only needed for URLs

    try:
        with requests.get(url, stream=True, timeout=timeout) as response:
            if response.status_code >= 400:
                raise UserError(f"download failed: HTTP {response.status_code} "
                                f"{response.reason or ''} for {url}".replace("  ", " "))
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            digest = hashlib.sha256()
            received = 0
            with atomic_open(dest, "wb") as f, Progress(expected, desc=dest.name[17:], unit="B") as bar:
                for chunk in response.iter_content(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                if expected is not None and received != expected:
                    raise UserError(f"download of {url} ended early: got {received} of {expected} bytes "
                                    "(connection dropped?); nothing was cached, try again")
                _check_sha256(digest.hexdigest(), sha256, url)
    except requests.Timeout:
        raise UserError(f"download timed out after {timeout:g} s without data: {url} "
                        "(check the network, or raise the timeout)") from None
    except requests.exceptions.ChunkedEncodingError as e:
        raise UserError(f"download of {url} ended early ({_reason(e)}); nothing was cached, "
                        "try again") from None
    except requests.ConnectionError as e:
        raise UserError(f"could not connect to download {url} ({_reason(e)}); check the URL and "
                        "the network") from None
    except requests.RequestException as e:
        raise UserError(f"download failed for {url}: {_reason(e)}") from None
    return dest


def _reason(error: Exception) -> str:
    """The innermost message of a requests/urllib3 exception chain, on one line."""
    while error.args and isinstance(error.args[0], Exception):
        error = error.args[0]
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]
