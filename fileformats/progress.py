"""A small progress bar on stderr (no dependency). Shown on a terminal or when REFINER_PROGRESS=1;
silent otherwise (logs, CI), REFINER_PROGRESS=0 turns it off everywhere."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    flag = os.environ.get("REFINER_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false", "no")
    return sys.stderr.isatty()


class Progress:
    """`with Progress(total, desc) as p: p.update(n, loss=...)` — a one-line bar with rate and ETA."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", initial: int = 0,
                 enabled: bool | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.enabled = progress_enabled() if enabled is None else enabled
        self._start = time.perf_counter()
        self._start_n = initial
        self._last = 0.0
        self.postfix: dict[str, object] = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **postfix: object) -> None:
        self.n += n
        self.postfix.update(postfix)
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.n == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        parts = [f"{self.desc}:" if self.desc else ""]
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(frac * 20)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            parts.append(f"[{bar:<20}] {self.n}/{self.total} {rate:.2f} {self.unit}/s ETA {_fmt(eta)}")
        else:
            parts.append(f"{self.n} {self.unit} {rate:.2f} {self.unit}/s")
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items()]
        sys.stderr.write("\r" + " ".join(p for p in parts if p) + "\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it"
             ) -> Iterator[T]:
    """Wrap an iterable with a progress bar."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, unit) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def _fmt(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
