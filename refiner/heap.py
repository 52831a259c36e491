"""Where CPU tensors' memory comes from: glibc's malloc serves a request below its mmap threshold from the heap and
one at or above it from a fresh mapping that is returned to the system when freed. The threshold starts at 128 KiB
and, by default, rises to the size of each mapped block that is freed (up to 32 MiB), so a training loop's
activations soon all come from the heap; the heap reuses freed memory only where a later request fits, and the
blocks of one iteration rarely land where the last one's were freed. The peak RSS of a CPU iteration is then the
live peak plus that fragmentation: 0.2-0.5 GB for the CIFAR-10 DDPM++ iteration at batch 8 (README, "Speed").
A fixed threshold (mallopt M_MMAP_THRESHOLD, which also stops it from rising) maps every block of at least that
size, so freeing it returns it at once, at the cost of a page fault per page when it is mapped again."""

from __future__ import annotations

import ctypes
import platform

from common.errors import UserError

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h)
MAX_MMAP_THRESHOLD_MIB = 32  # glibc's ceiling on 64-bit systems (HEAP_MAX_SIZE / 2)
NOT_GLIBC = ("--mmap-threshold sets glibc's malloc (Linux); this system's C library is not glibc, so leave the "
             "option out")


def glibc_available() -> bool:
    """Whether this process runs on glibc (Linux distributions other than Alpine's musl)."""
    return platform.libc_ver()[0] == "glibc"


def set_mmap_threshold(mib: float) -> None:
    """Serve every CPU allocation of at least `mib` MiB from its own mapping, returned to the system when freed
    (process-wide, for the rest of the process; glibc only)."""
    if not glibc_available():
        raise UserError(NOT_GLIBC)
    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(mib * 2**20)):
        raise UserError(f"glibc refused --mmap-threshold {mib} MiB (it takes 0 < MiB <= {MAX_MMAP_THRESHOLD_MIB})")
