"""The loop's optimiser: Adam (Kingma & Ba 2015) with torch's fused kernel where it applies, without a
first-moment buffer when β1 = 0 (Diff-Instruct's and SiD's setting), and with its state allocated when it is
made rather than at the first step."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

# What a parameter's first-moment slot holds between steps under β1 = 0 (see `MomentFreeAdam`).
_NO_MOMENT = torch.empty(0)


class MomentFreeAdam(torch.optim.Adam):
    """Adam with β1 = 0, keeping no first moment: m_t = β1·m_{t−1} + (1 − β1)·g_t is g_t itself, so for each step
    the gradient is lent to the kernel as m (which it overwrites with the same values, m = 0·m + 1·g) and between
    steps the slot holds an empty tensor. The update is Adam's, bit for bit; one copy of the weights less per
    network (223 MB for a 55.7M-parameter U-Net). Checkpoints store the empty slot; a checkpoint written with a
    full first moment loads too (it is replaced by the gradient at the next step)."""

    def __init__(self, params: list[nn.Parameter], **kwargs: Any):
        super().__init__(params, **kwargs)
        if any(group["betas"][0] != 0 for group in self.param_groups):
            raise ValueError("MomentFreeAdam needs beta1 = 0")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p in self.state:  # else torch's first step creates it (a zero m)
                    self.state[p]["exp_avg"] = p.grad
        loss = super().step(closure)
        for state in self.state.values():
            state["exp_avg"] = _NO_MOMENT
        return loss


def allocate_state(optimizer: torch.optim.Adam) -> None:
    """Create every parameter's Adam state now, as torch's Adam would at its first step (step 0, zero moments;
    `MomentFreeAdam`'s empty first moment), so that the state's memory is taken before the first batch's
    activations and not in the middle of the heap they leave: on a CPU, glibc then reuses the activations' memory
    from one iteration to the next (peak RSS of a CIFAR-10 DDPM++ distillation iteration at batch 8: 4.09 → 3.65
    GB). The update is unchanged bit for bit."""
    for group in optimizer.param_groups:
        on_device = group["fused"] or group["capturable"]  # torch keeps `step` on the parameter's device then
        for p in group["params"]:
            step_dtype = torch.float32 if on_device or torch.get_default_dtype() != torch.float64 else torch.float64
            state = {"step": torch.zeros((), dtype=step_dtype, device=p.device if on_device else "cpu"),
                     "exp_avg": _NO_MOMENT if isinstance(optimizer, MomentFreeAdam) else torch.zeros_like(p),
                     "exp_avg_sq": torch.zeros_like(p)}
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
            optimizer.state[p] = state


def make_adam(params: list[nn.Parameter], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam with torch's fused kernel where every parameter is a float tensor on the CPU or a CUDA device (4.4x
    faster than the per-tensor loop for a 55.7M-parameter U-Net on one CPU thread, same update to float rounding),
    the per-tensor loop otherwise; `MomentFreeAdam` when β1 = 0; its state allocated at once (`allocate_state`)."""
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = (MomentFreeAdam if betas[0] == 0 else torch.optim.Adam)(params, lr=lr, betas=betas,
                                                                          fused=fused or None)
    allocate_state(optimizer)
    return optimizer
