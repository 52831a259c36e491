"""The one path every file write of the project goes through.

A whole file is written to a temporary file beside its destination (`.NAME.XXXXXXXX.tmp`), flushed and
fsync'ed, then renamed onto the destination in one step, so a reader sees the old file or the complete new
one, never a partial one. On any failure the temporary file is removed. Temporary files of a process that
was killed are removed by `remove_stale_temps` when their folder is used again.

A write that fails because of the disk or its permissions (full, over quota, over the file-size limit,
read-only, not permitted) becomes a `UserError` that names the path and the cause in plain words, which the
command line prints as one line `Error: ...` with exit code 2.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable

from common.errors import UserError

OUT_ADVICE = "choose another --out"  # where else to write, for files of a run or a command's output
TEMP_NAME = re.compile(r"^\..+\.tmp$")  # .NAME.XXXXXXXX.tmp, as atomic_open and atomic_folder name them

_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (over the file system's or this process's file-size limit)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "a name in the path is too long for the file system",
    errno.ELOOP: "too many levels of symbolic links (a link loop) in the path",
    errno.EEXIST: "a file or link of that name is in the way",
    errno.EISDIR: "the path is a folder",
    errno.ENOENT: "no such file or folder (a part of the path is missing or cannot be made)",
}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_PERMITTED = {errno.EACCES, errno.EPERM, errno.EROFS}


def disk_error(error: BaseException) -> OSError | None:
    """The OSError of the disk or its permissions behind `error` (itself, or its cause or context: torch.save
    reports a failed write as a RuntimeError raised while handling the OSError), else None."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _CAUSES:
            return e
        e = e.__cause__ or e.__context__
    return None


def write_failure(error: BaseException, path: str | os.PathLike, advice: str = OUT_ADVICE) -> UserError | None:
    """The UserError for `error` raised while writing `path`, or None when the disk is not the cause."""
    if isinstance(error, UserError):
        return None
    cause = disk_error(error)
    if cause is None:
        return None
    remedy = "free space or " + advice if cause.errno in _NO_SPACE else \
        "make it writable or " + advice if cause.errno in _NOT_PERMITTED else "give another path or " + advice
    return UserError(f"{_CAUSES[cause.errno]} while writing {path}; {remedy}")


def os_error_message(error: OSError) -> str | None:
    """One line for an OSError of the disk or its permissions that reached the command line unhandled."""
    if error.errno not in _CAUSES:
        return None
    where = f" ({error.filename})" if error.filename else ""
    return f"{_CAUSES[error.errno]}{where}; check the path, its permissions and the free space"


@contextlib.contextmanager
def write_errors(path: str | os.PathLike, advice: str = OUT_ADVICE) -> Iterator[None]:
    """Turn a failure of the disk or its permissions inside the block into a UserError naming `path`."""
    try:
        yield
    except Exception as e:
        failure = write_failure(e, path, advice)
        if failure is None:
            raise
        raise failure from None


def ensure_dir(path: str | os.PathLike, advice: str = OUT_ADVICE) -> Path:
    """Create the folder `path` (and its parents) if needed; a failure is a UserError naming it."""
    path = Path(path)
    with write_errors(path, advice):
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file, not a folder; {advice}")
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", advice: str = OUT_ADVICE) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path` in one rename.

    On any exception the temporary file is removed and `path` is left as it was; a failure of the disk or
    its permissions becomes a UserError naming `path` and the cause (`advice` says where else to write).
    """
    path = Path(path)
    ensure_dir(path.parent, advice)
    tmp = None
    with write_errors(path, advice):
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO], object], mode: str = "wb",
                 advice: str = OUT_ADVICE) -> Path:
    """Call `write(f)` on a temporary file and rename it onto `path`. Returns `path`."""
    with atomic_open(path, mode, advice) as f:
        write(f)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, advice: str = OUT_ADVICE) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w", advice=advice)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, advice: str = OUT_ADVICE) -> Path:
    """Copy the bytes and the permission bits of `src` to `dst` through a temporary file and a rename; a
    folder is copied into a temporary folder that then takes its place (`atomic_folder`)."""
    if os.path.isdir(src):
        with atomic_folder(dst, advice) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return Path(dst)
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20), advice=advice)
    with write_errors(dst, advice):
        shutil.copymode(src, dst)
    return Path(dst)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # linux/fcntl.h, linux/fs.h


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE); False, with nothing changed,
    where the C library, the kernel or the file system does not offer it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _temp_folder(folder: Path) -> Path:
    """An empty folder `.NAME.XXXXXXXX.tmp` beside `folder`, with the usual permissions (mkdtemp makes 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike, advice: str = OUT_ADVICE) -> Iterator[Path]:
    """A temporary folder beside `folder` to write into; on success it becomes `folder` in one rename. An
    existing `folder` is swapped whole: in one step where the system can exchange two paths (`exchange`),
    else it is renamed aside, the new one takes its name and the old one is removed, or renamed back if the
    new one cannot take its place. A reader never sees a mix of old and new files. On any exception the
    temporary folder is removed and `folder` is as it was."""
    folder = Path(folder)
    ensure_dir(folder.parent, advice)
    tmp = None
    with write_errors(folder, advice):
        try:
            tmp = _temp_folder(folder)
            yield tmp
            if not folder.is_dir():
                os.rename(tmp, folder)
                return
            if exchange(tmp, folder):  # tmp now holds the old folder, removed below
                return
            old = _temp_folder(folder)
            os.rename(folder, old)  # onto an empty folder: allowed, and one step
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def append_text(path: str | os.PathLike, text: str, advice: str = OUT_ADVICE) -> None:
    """Append `text` to `path` (e.g. one JSON line of a log) as a whole or not at all: when the write fails
    part-way, the file is cut back to its previous length."""
    data = memoryview(text.encode("utf-8"))
    with write_errors(path, advice):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
            except BaseException:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def remove_stale_temps(*folders: str | os.PathLike, older_than: float = 0.0, of: str | None = None) -> list[Path]:
    """Remove the temporary files and folders (`.NAME.XXXXXXXX.tmp`) that a killed process left in `folders`,
    not descending into sub-folders; `older_than` (seconds since the last change) spares the temporary files
    of live writers in a folder that several processes share, like the download cache; `of` keeps to those of
    the file or folder of that name (and of its `.bak`), in a folder of the user's. Returns what went."""
    removed = []
    now = time.time()
    for folder in folders:
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if not TEMP_NAME.match(entry.name) or of is not None and not entry.name.startswith(f".{of}."):
                    continue
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
