"""Stored constructor arguments checked before a network is built from them.

A network file names the arguments its network was made with (`_init_kwargs` of an NVIDIA pickle,
BigGAN's config.json); building from them allocates whatever they say. Two checks come first:

1. `check_ranges`: every size-like argument lies in a range that covers the published networks
   (EDM's ImageNet-64 ADM, StyleGAN2 at 1024 px, BigGAN-deep 512, ...) with a wide margin, so a
   stored `model_channels = 2**20` is refused naming the argument and its range.
2. `meta_shapes`: the network is built on torch's `meta` device (shapes only, nothing allocated) and
   the loader compares its tensor shapes with the file's before building it for real, so arguments
   that are each in range but together describe a network far larger than the file cannot allocate
   memory either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import UserError
from common.values import is_integer


@dataclass(frozen=True)
class Bound:
    """Integers low..high; with `items`, a list of at most that many such integers."""

    low: int
    high: int
    items: int | None = None

    def describe(self) -> str:
        if self.items is None:
            return f"an integer from {self.low} to {self.high:,}"
        return f"a list of at most {self.items} integers from {self.low} to {self.high:,}"

    def admits(self, value: Any) -> bool:
        if self.items is None:
            return is_integer(value) and self.low <= value <= self.high
        return (isinstance(value, (list, tuple)) and len(value) <= self.items
                and all(is_integer(v) and self.low <= v <= self.high for v in value))


def check_ranges(name: str, what: str, values: Mapping[str, Any], bounds: Mapping[str, Bound]) -> None:
    """UserError for the first argument in `bounds` whose value in `values` is out of range (absent
    arguments and None, the originals' "use the default", pass)."""
    for key, bound in bounds.items():
        value = values.get(key)
        if value is not None and not bound.admits(value):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise UserError(f"{name}: {what} argument {key} = {shown} is outside what such a network can "
                            f"sensibly have ({bound.describe()}); the file is corrupt or hostile and was "
                            "refused before building anything")


def meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Shapes of the state_dict() of the network `build` makes, built on the meta device (nothing is
    allocated). Comparing them with the file's tensors before the real build bounds its memory by
    what the file holds. (The first arithmetic on meta tensors imports torch._dynamo, about a second,
    once per process; training imports it anyway with the optimizer.)"""
    with torch.device("meta"):
        network = build()
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def shape_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], shown: int = 3
                   ) -> str | None:
    """How the tensors of a file (`found`: name -> shape) differ from those of the network built for it
    (`expected`, e.g. from `meta_shapes`), for a loader's message; None when names and shapes agree.
    Names the first `shown` of each kind: "2 entries missing ['a', 'b']; 1 unexpected ['c'];
    1 of wrong shape ['d: (3, 4) in the file, (3, 5) built']"."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: {tuple(found[k])} in the file, {tuple(v)} built" for k, v in expected.items()
             if k in found and tuple(found[k]) != tuple(v)]
    parts = [f"{len(items)} {label} {items[:shown]}{' ...' if len(items) > shown else ''}"
             for label, items in ((f"{'entry' if len(missing) == 1 else 'entries'} missing", missing),
                                  ("unexpected", unexpected), ("of wrong shape", wrong)) if items]
    return "; ".join(parts) or None
