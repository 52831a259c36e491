"""torch.save files: telling them (state dicts) from NVIDIA network pickles by their first bytes, and writing
the legacy (non-zip) format of the published BigGAN files byte for byte the same every time."""

from __future__ import annotations

import os
import pickle
import re
import sys
import warnings
import zipfile
from typing import IO, Any

import torch

from common.errors import UserError
from fileformats.sources import open_source

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8"  # torch.save before 1.6


def local_path(source: Any) -> str | None:
    """The file a path or URL names (URLs are downloaded to the cache), None for other sources."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = os.fspath(source)
    return str(open_source(text)) if isinstance(text, str) and "://" in text else text


def is_torch_checkpoint(path: str | None) -> bool:
    """A torch.save file (zip archive or the legacy format)."""
    if path is None or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_TORCH_MAGIC))
    return head.startswith(ZIP_MAGIC) or head == LEGACY_TORCH_MAGIC


def is_torchscript(path: str | os.PathLike) -> bool:
    """TorchScript archives are zip files with `<name>/constants.pkl` and `<name>/code/` entries."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def unreadable_reason(error: Exception) -> str:
    """Why torch.load refused a file, in one line a user can act on: the weights-only refusal says so, torch's
    C++ location ("[enforce fail at inline_container.cc:180] .") is dropped, and a zip that torch.save did not
    write is named as such."""
    text = str(error)
    if "weights_only" in text or "Weights only" in text:
        return "it holds objects other than tensors and plain data, which are never loaded"
    line = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", text.splitlines()[0] if text else "")[:200]
    if "file in archive is not in a subdirectory" in line or "archive does not contain" in line:
        return f"a zip archive that torch.save did not write: {line}"
    if any(s in text for s in ("PytorchStreamReader", "miniz", "hasRecord", "central directory")):
        return f"a damaged torch file (a truncated download?): {line}"
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def load_weights(path: str | os.PathLike, name: str, expected: str) -> Any:
    """torch.load(path, weights_only=True) onto the CPU: tensors and plain data only, nothing executed. A file
    torch cannot read is a UserError naming `name`, why (`unreadable_reason`) and `expected` (what to give)."""
    if is_torchscript(path):  # torch.load would hand it to torch.jit.load, with a warning
        raise UserError(f"{name}: a TorchScript archive (compiled code, which refiner runs only as the Inception "
                        f"detector of `refiner metrics --detector`), not weights; {expected}")
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it did not write: the refusal says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for damaged, foreign or unsafe files
        raise UserError(f"{name}: cannot read it as a torch file ({unreadable_reason(e)}); {expected}") from None


def save_legacy(state: dict[str, torch.Tensor], f: IO[bytes]) -> None:  # tensors on the CPU
    """`torch.save(state, f, _use_new_zipfile_serialization=False)` (torch's legacy format: magic number,
    protocol 1001, system info, the pickled object whose storages are persistent ids, the list of storage
    keys, then each storage as an 8-byte element count and its bytes), except that storages are named "0",
    "1", ... in order of first use where torch names them by memory address: the same tensors always give
    the same bytes. torch.load reads it as it reads torch's own."""
    storages: dict[int, tuple[str, torch.UntypedStorage, torch.dtype]] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> tuple | None:
            if not isinstance(obj, torch.storage.TypedStorage):
                return None
            untyped = obj._untyped_storage
            key = storages.setdefault(untyped._cdata, (str(len(storages)), untyped, obj.dtype))[0]
            return ("storage", getattr(torch, obj._pickle_storage_type()), key, "cpu", obj._size(), None)

    protocol = 2  # torch's DEFAULT_PROTOCOL
    for value in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": sys.byteorder == "little",
                                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(value, f, protocol=protocol)
    Pickler(f, protocol=protocol).dump(state)  # as given (an OrderedDict keeps its _metadata), on the CPU
    ordered = sorted(storages.values(), key=lambda entry: entry[0])  # torch writes them in key order
    pickle.dump([key for key, _, _ in ordered], f, protocol=protocol)
    f.flush()
    for _, untyped, dtype in ordered:
        untyped._write_file(f, torch.serialization._should_read_directly(f), True, torch._utils._element_size(dtype))
