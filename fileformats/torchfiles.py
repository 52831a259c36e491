"""Telling torch.save files (state dicts) from NVIDIA network pickles by their first bytes."""

from __future__ import annotations

import os
from typing import Any

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
