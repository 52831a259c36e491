"""refiner.distributed.GradientReducer in two gloo processes on the CPU: the gradients' mean over processes,
all-reduced bucket by bucket while the backward runs. Two processes, each on half of every batch, take the
same gradient-descent steps as one process on the whole batch (to float rounding); an unused parameter
keeps no gradient; a parameter used twice gets the sum of both uses; some buckets are all-reduced before
the backward reaches the first layer (the overlap). The loop's use of it is tested end to end in
test_distributed.py (torchrun)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as td
import torch.multiprocessing as mp
from torch import nn

from refiner import distributed as dist

STEPS, BATCH = 3, 8


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.shared, self.last = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.unused = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.shared(torch.tanh(self.shared(torch.tanh(self.first(x))))))


def _train(rank: int, world: int) -> tuple[dict[str, torch.Tensor], list[int], int]:
    """STEPS gradient-descent steps (x −= 0.1·∇: a sum over processes instead of the mean would double them)
    on this process's slice of each global batch. Returns (parameters, all-reduces launched before the first
    layer's gradient was computed, per step, number of buckets)."""
    torch.manual_seed(0)
    net = _Net()
    reducer = dist.GradientReducer(list(net.parameters()), bucket_bytes=300)  # several buckets of a few tensors
    launched, before_first = [0], []
    if world > 1:
        all_reduce = td.all_reduce
        td.all_reduce = lambda *a, **k: (launched.__setitem__(0, launched[0] + 1), all_reduce(*a, **k))[1]
    net.first.weight.register_hook(lambda g: before_first.append(launched[0]))
    data = torch.Generator().manual_seed(1)
    n = BATCH // world
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 4, generator=data), torch.randn(BATCH, 3, generator=data)
        x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        net.zero_grad(set_to_none=True)
        launched[0] = 0
        with reducer:
            (net(x) - y).square().mean().backward()
        assert net.unused.grad is None
        with torch.no_grad():
            for p in net.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    return {k: v.detach().clone() for k, v in net.named_parameters()}, before_first, len(reducer.buckets)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    td.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.save(_train(rank, world), Path(out) / f"rank{rank}.pt")
    finally:
        td.destroy_process_group()


def test_two_processes_take_the_steps_of_one(tmp_path: Path):
    # fork: the children start with torch imported (spawning two fresh interpreters costs ~10 s here)
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single, _, no_buckets = _train(0, 1)
    assert no_buckets == 0  # one process: no hooks, no communication
    torch.manual_seed(0)
    start = dict(_Net().named_parameters())
    for params, before_first, buckets in ranks:
        assert buckets >= 4
        assert len(before_first) == STEPS and min(before_first) >= 1  # overlap: reduced during the backward
        for k, v in single.items():
            torch.testing.assert_close(params[k], v, rtol=1e-5, atol=1e-6)
            assert k == "unused" or not torch.equal(v, start[k].detach())  # every used parameter moved
    assert all(torch.equal(ranks[0][0][k], ranks[1][0][k]) for k in single)  # the processes agree exactly
