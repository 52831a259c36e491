"""The EDM U-Nets' attention (teachers.edm_layers.attention, PyTorch's scaled_dot_product_attention) against
the explicit formula of EDM's UNetBlock (NVlabs/edm training/networks.py, AttentionOp): weights
w = softmax(qᵀk/√c) computed in float32 from the inputs' values, cast back to the inputs' dtype, then
out = v·wᵀ. The NVIDIA fixtures' reference outputs (test_edm_networks) run through this function too."""

from __future__ import annotations

import math

import pytest
import torch

from teachers.edm_layers import attention


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """EDM's two einsums, [B, c, L] in and out, weights in float32 (or float64 for float64 inputs)."""
    work = torch.promote_types(q.dtype, torch.float32)
    w = torch.einsum("ncq,nck->nqk", q.to(work), k.to(work) / math.sqrt(q.shape[1])).softmax(dim=2).to(q.dtype)
    return torch.einsum("nqk,nck->ncq", w, v)


def _qkv(dtype: torch.dtype, n: int = 6, c: int = 32, length: int = 64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    # scaled so the softmax is far from uniform (logits of std ~3), as in trained networks
    return tuple((torch.randn(n, c, length, generator=g, dtype=torch.float64) * s).to(dtype) for s in (1.7, 1.7, 1.0))


def test_float32_equals_explicit_formula():
    q, k, v = _qkv(torch.float32)
    out = attention(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _explicit(q, k, v), rtol=1e-5, atol=1e-5)
    exact = _explicit(*(t.double() for t in (q, k, v)))
    assert (out.double() - exact).abs().max() < 1e-5


def test_gradients_equal_explicit_formula():
    inputs = [t.requires_grad_() for t in _qkv(torch.float32, n=2, c=8, length=16)]
    reference = [t.detach().clone().requires_grad_() for t in inputs]
    g = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    (attention(*inputs) * g).sum().backward()
    (_explicit(*reference) * g).sum().backward()
    for a, b in zip(inputs, reference):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_as_accurate_as_edm(dtype: torch.dtype):
    """In bf16 / fp16 the fused kernel accumulates in float32 like EDM's float32 weights: its error against
    the exact result (float64 from the same rounded inputs) is within 1.5x EDM's own rounding error."""
    q, k, v = _qkv(dtype)
    exact = _explicit(*(t.double() for t in (q, k, v)))
    ours = (attention(q, k, v).double() - exact).abs()
    edm = (_explicit(q, k, v).double() - exact).abs()
    assert attention(q, k, v).dtype == dtype
    assert ours.mean() <= 1.5 * edm.mean() and ours.max() <= 1.5 * edm.max()
