"""List `Release(...)` rows for fileformats/module_sources.py from a git clone: the SHA-256 of the text
torch_utils.persistence would store for each module file at every commit that changed it.

    python scripts/module_source_hashes.py CLONE OWNER/NAME training/networks.py training/augment.py

Only the hashes are printed; the module text itself never enters this repository.
"""

from __future__ import annotations

import subprocess
import sys

from fileformats.module_sources import source_sha256, stored_text


def rows(clone: str, repo: str, paths: list[str]) -> list[str]:
    out = []
    for path in paths:
        log = subprocess.run(["git", "-C", clone, "log", "--format=%H", "--", path], capture_output=True,
                             text=True, check=True).stdout.split()
        for commit in log:
            raw = subprocess.run(["git", "-C", clone, "show", f"{commit}:{path}"], capture_output=True,
                                 check=True).stdout
            digest = source_sha256(stored_text(raw))
            out.append(f'    Release("{repo}", "{path}", "{commit}",\n            "{digest}"),')
    return out


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    print("\n".join(rows(sys.argv[1], sys.argv[2], sys.argv[3:])))
