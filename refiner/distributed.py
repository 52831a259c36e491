"""torch.distributed helpers: a process group from torchrun's environment (NCCL on GPUs, gloo on CPU),
and the collectives the loop and the jobs need. Without torchrun everything is a no-op (world size 1)."""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as td
from torch import nn

from common.errors import UserError

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


def check_same(values: dict[str, str]) -> None:
    """Refuse, on every process alike, when the processes disagree on any of `values` (fingerprints of their
    inputs and options): each would train on its own files while their gradients are averaged."""
    if not td.is_initialized() or td.get_world_size() == 1:
        return
    gathered: list = [None] * td.get_world_size()
    td.all_gather_object(gathered, values)
    differing = sorted(k for k in values if len({g.get(k) for g in gathered}) > 1)
    if differing:
        raise UserError(f"the {len(gathered)} processes differ in {', '.join(differing)}: every process must get "
                        "the same files and options (across machines: the same files at the same paths)")


def fingerprint(module: nn.Module) -> str:
    """A module's identity for `check_same`: the sha256 of the file it was loaded from where it records one
    (a teacher), else the sha256 of its tensors' names and shapes (its architecture)."""
    identity = getattr(module, "identity", None)
    if isinstance(identity, dict) and identity.get("sha256"):
        return identity["sha256"]
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)};".encode())
    return digest.hexdigest()


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


# Gradient bytes per bucket: DistributedDataParallel's default (bucket_cap_mb 25).
BUCKET_BYTES = 25 * 2**20


class GradientReducer:
    """The mean over processes of the gradients of `params`, all-reduced in buckets while the backward pass is
    still running: the overlap of PyTorch's DistributedDataParallel (Li et al. 2020, "PyTorch Distributed:
    Experiences on Accelerating Data Parallel Training", section 3.2.3), without wrapping the networks, which the
    loop also calls outside their own optimiser's backward (the fake score in the generator step).

        with reducer:
            loss.backward()
        # every p.grad of `params` is now the mean over processes

    Buckets of about `bucket_bytes` hold the parameters in reverse order, the order backward reaches them. A
    hook after each parameter's gradient is accumulated counts it; a complete bucket is flattened and its
    all-reduce launched asynchronously once every earlier bucket is launched, so all processes issue the
    collectives in the same order. A bucket with a parameter that got no gradient (unused in this backward, on
    every process alike) is launched after the backward, without that parameter (its grad stays None). The
    hooks act only inside the `with`, so gradients other backward passes leave on these parameters launch
    nothing. With one process nothing is registered and the `with` does nothing."""

    def __init__(self, params: list[nn.Parameter], bucket_bytes: int = BUCKET_BYTES):
        self.buckets: list[list[nn.Parameter]] = []
        self._bucket_of: dict[nn.Parameter, int] = {}
        self._armed = False
        if world_size() == 1:
            return
        size = 0
        for p in reversed(params):
            if not self.buckets or size + p.numel() * p.element_size() > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            self._bucket_of[p] = len(self.buckets) - 1
            size += p.numel() * p.element_size()
            p.register_post_accumulate_grad_hook(self._ready)

    def __enter__(self) -> GradientReducer:
        self._armed = bool(self.buckets)
        self._waiting = [len(b) for b in self.buckets]  # parameters still without a gradient, per bucket
        self._next = 0  # the next bucket to launch
        self._launched: list[tuple[list[nn.Parameter], torch.Tensor, td.Work]] = []
        return self

    def _ready(self, p: nn.Parameter) -> None:
        if not self._armed:
            return
        self._waiting[self._bucket_of[p]] -= 1
        while self._next < len(self.buckets) and self._waiting[self._next] == 0:
            self._launch()

    def _launch(self) -> None:
        params = [p for p in self.buckets[self._next] if p.grad is not None]
        self._next += 1
        if params:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            self._launched.append((params, flat, td.all_reduce(flat, async_op=True)))

    def __exit__(self, error_type, *_) -> None:
        if not self._armed:
            return
        self._armed = False
        if error_type is not None:  # the backward failed: nothing to average (the error is raised)
            return
        while self._next < len(self.buckets):
            self._launch()
        for params, flat, work in self._launched:
            work.wait()
            flat /= td.get_world_size()
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        self._launched = []


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
