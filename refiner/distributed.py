"""torch.distributed helpers: a process group from torchrun's environment (NCCL on GPUs, gloo on CPU),
and the three collectives the loop needs. Without torchrun everything is a no-op (world size 1)."""

from __future__ import annotations

import os

import torch
import torch.distributed as td
from torch import nn


def init_from_env(device_type: str) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        td.init_process_group("nccl" if device_type == "cuda" else "gloo")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


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
