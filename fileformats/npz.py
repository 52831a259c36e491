"""Reading .npz files (numpy.savez): plain arrays only, with one-line errors."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence

import numpy as np

from common.errors import UserError


def read_npz(path: str | os.PathLike, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (only `keys`, those present, when given), without Python objects: a file
    that is no numpy zip, or holds pickled objects, is a UserError that says so."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not an .npz file (numpy.savez writes a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.keys() if keys is None or k in keys}
    except ValueError as e:
        if "pickle" in str(e):
            raise UserError(f"{path}: holds Python objects (pickled data), which are never loaded; store plain "
                            "arrays") from None
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
