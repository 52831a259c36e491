"""torch.distributed helpers: a process group from torchrun's environment (NCCL on GPUs, gloo on CPU),
and the collectives the loop and the jobs need. Without torchrun everything is a no-op (world size 1)."""

from __future__ import annotations

import datetime
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as td
from torch import nn

from fileformats.errors import UserError

T = TypeVar("T")

# Rank 0 alone computes metrics, grids and reports while the others wait in the next collective;
# the default timeouts (NCCL 10 min) would cut a long FID off.
TIMEOUT = datetime.timedelta(hours=2)


def init_from_env(device_type: str) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group if launched by it; this process's device (cuda:LOCAL_RANK on GPUs)."""
    init_from_env(device.type)
    if device.type == "cuda" and td.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def on_rank0(fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and give every process its result; a UserError raised there is raised
    on every process (so all of them stop with the same message)."""
    if not td.is_initialized() or td.get_world_size() == 1:
        return fn()
    box: list = [None]
    if td.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    td.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


def average_gradients(grads: list[torch.Tensor]) -> None:
    """Mean of every gradient over processes (one flattened all-reduce)."""
    if not td.is_initialized() or td.get_world_size() == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    td.all_reduce(flat)
    flat /= td.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: nn.Module) -> None:
    """Give every process rank 0's parameters and buffers."""
    if td.is_initialized() and td.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            td.broadcast(t.data, src=0)


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Every process's `t` (same shape on each) concatenated along dim 0 in rank order; `t` with one process."""
    if not td.is_initialized() or td.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(td.get_world_size())]
    td.all_gather(parts, t.contiguous())
    return torch.cat(parts)
