"""The loop's Adam: with β1 = 0 it keeps no first-moment buffer and gives torch's Adam update bit for bit (on the
CPU, and on a GPU where there is one: the fused CUDA kernel reads the gradient lent as m)."""

from __future__ import annotations

import io

import pytest
import torch

from refiner.optim import MomentFreeAdam, allocate_state, make_adam

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


def _params(seed: int = 0, device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(device))
            for shape in ((64, 32), (32,), (3, 3, 4, 4))]


def _train(optimizer_of, steps: int = 5, params=None, device: str = "cpu"
           ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = params or _params(device=device)
    opt = optimizer_of(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.device)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params, opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_beta1_zero_gives_torchs_adam_update_without_a_first_moment(fused: bool, device: str):
    kwargs = dict(lr=1e-2, betas=(0.0, 0.999), fused=fused or None)
    ours, opt = _train(lambda p: MomentFreeAdam(p, **kwargs), device=device)
    reference, ref_opt = _train(lambda p: torch.optim.Adam(p, **kwargs), device=device)
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    for p, q in zip(ours, reference):
        assert opt.state[p]["exp_avg"].numel() == 0 and ref_opt.state[q]["exp_avg"].shape == q.shape
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"])


def test_a_checkpoint_resumes_and_one_with_a_full_first_moment_loads():
    kwargs = dict(lr=1e-2, betas=(0.0, 0.999), fused=True)
    straight, _ = _train(lambda p: MomentFreeAdam(p, **kwargs), steps=6)
    for saved_by in (MomentFreeAdam, torch.optim.Adam):  # ours, and torch's (or an older refiner's) with m
        params, opt = _train(lambda p, saved_by=saved_by: saved_by(p, **kwargs), steps=3)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        resumed = MomentFreeAdam(params, **kwargs)
        resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        # the remaining 3 steps with the straight run's gradients (`_train`'s draws)
        g = torch.Generator().manual_seed(1)
        draws = [[torch.randn(p.shape, generator=g) * 1e-2 for p in params] for _ in range(6)]
        for step in range(3, 6):
            for p, d in zip(params, draws[step]):
                p.grad = d
            resumed.step()
            resumed.zero_grad(set_to_none=True)
        for a, b in zip(params, straight):
            assert torch.equal(a, b), saved_by.__name__


def test_make_adam_keeps_the_first_moment_only_when_beta1_is_not_zero():
    assert type(make_adam(_params(), 1e-3, (0.0, 0.99))) is MomentFreeAdam
    opt = make_adam(_params(), 1e-3, (0.9, 0.99))
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["fused"]
    with pytest.raises(ValueError, match="beta1 = 0"):
        MomentFreeAdam(_params(), lr=1e-3, betas=(0.5, 0.99))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.99)])
@pytest.mark.parametrize("fused", [True, False])
def test_the_state_is_allocated_up_front_and_steps_as_torchs_adam(betas, fused: bool, device: str):
    """The state exists before the first step and the steps write into that memory (no allocation in the middle
    of a run's heap); the update equals torch's lazily initialised Adam bit for bit."""
    if fused:
        opt = make_adam(_params(device=device), 1e-2, betas)
    else:  # the per-tensor loop (make_adam's choice for parameters the fused kernel does not take)
        opt = (MomentFreeAdam if betas[0] == 0 else torch.optim.Adam)(_params(device=device), lr=1e-2, betas=betas)
        allocate_state(opt)
    assert opt.param_groups[0]["fused"] is (True if fused else None)
    params = opt.param_groups[0]["params"]
    before = {id(p): {k: v.data_ptr() for k, v in opt.state[p].items() if v.numel()} for p in params}
    assert all(set(b) == ({"step", "exp_avg_sq"} if betas[0] == 0 else {"step", "exp_avg", "exp_avg_sq"})
               for b in before.values())
    ours, _ = _train(lambda p: opt, params=params)
    reference, ref_opt = _train(lambda p: torch.optim.Adam(p, lr=1e-2, betas=betas, fused=fused or None),
                                device=device)
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)
    for p, q in zip(ours, reference):
        assert {k: opt.state[p][k].data_ptr() for k in before[id(p)]} == before[id(p)]
        assert opt.state[p]["step"].device == ref_opt.state[q]["step"].device
        assert opt.state[p]["step"].dtype == ref_opt.state[q]["step"].dtype
