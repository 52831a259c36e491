"""--mmap-threshold: glibc maps CPU blocks of at least the threshold on their own and returns them when freed; by
default, once a mapped block has been freed, blocks of that size come from the heap and stay resident after free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError
from refiner import heap
from refiner.config import TrainConfig
from tests.test_distributed import _one_process, _state

needs_glibc = pytest.mark.skipif(not heap.glibc_available(), reason="glibc's malloc (Linux)")

# In a fresh process: one 2 MiB block allocated and freed (glibc's threshold rises to its size), then 100 blocks of
# 2 MiB, each followed by a small block that stays (so the heap cannot shrink from its top), then the big ones freed.
_FRAGMENT = """
import json, sys, torch
from refiner import heap
if sys.argv[1] != "default":
    heap.set_mmap_threshold(float(sys.argv[1]))
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
first = torch.ones(2**19)
del first
big, small = [], []
for _ in range(100):
    big.append(torch.ones(2**19))
    small.append(torch.ones(16))
before = rss()
del big
print(json.dumps({"freed": before - rss()}))
"""


def _returned_bytes(threshold: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, threshold], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])["freed"]


@needs_glibc
def test_blocks_above_the_threshold_are_returned_when_freed():
    """200 MiB freed: glibc's default keeps them resident, a 1 MiB threshold returns them."""
    assert _returned_bytes("default") < 20 * 2**20
    assert _returned_bytes("1") > 190 * 2**20


@pytest.mark.parametrize("mib", [0, -1, 33])
def test_a_threshold_outside_glibcs_range_is_refused(mib: float):
    with pytest.raises(UserError, match="--mmap-threshold is in MiB"):
        TrainConfig(mmap_threshold=mib).validate()


def test_without_glibc_the_option_is_refused_with_a_reason(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("", ""))
    with pytest.raises(UserError, match="not glibc, so leave the option out"):
        TrainConfig(mmap_threshold=8).validate()
    with pytest.raises(UserError, match="not glibc"):
        heap.set_mmap_threshold(8)


@needs_glibc
def test_a_run_sets_the_threshold_and_records_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[float] = []  # (not set for real: the setting is process-wide and would outlive this test)
    monkeypatch.setattr(heap, "set_mmap_threshold", calls.append)
    _one_process(tmp_path / "run", "--steps", "1", "--mmap-threshold", "8")
    assert calls == [8.0]
    assert _state(tmp_path / "run", 1)["config"]["mmap_threshold"] == 8.0
