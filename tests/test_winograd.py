"""--winograd: the EDM U-Nets' large float32 3×3 convolutions on the CPU run by NNPACK's fast kernels. The results
equal oneDNN's direct convolution (F.conv2d) to float rounding; small layers, other dtypes, and machines without
NNPACK run the direct convolution unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from refiner.cli import cli
from teachers import edm_layers
from teachers.edm_layers import conv_same, winograd_convs
from tests.test_distributed import ARGS, TEACHER_WEIGHTS, _flat, _one_process, _state

needs_nnpack = pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="NNPACK needs AVX2 (or ARM)")


@pytest.fixture
def nnpack_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The input shapes of NNPACK's convolution calls."""
    calls, nnpack = [], torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution",
                        lambda x, *a, **k: calls.append(tuple(x.shape)) or nnpack(x, *a, **k))
    return calls


def _conv_and_grads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, winograd: bool) -> tuple[torch.Tensor, ...]:
    x, w, b = (t.clone().requires_grad_(True) for t in (x, w, b))
    with winograd_convs(winograd):
        y = conv_same(x, w, b)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return y.detach(), x.grad, w.grad, b.grad


@needs_nnpack
def test_a_large_layer_runs_by_nnpack_and_equals_the_direct_convolution_to_float_rounding(nnpack_calls):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 128, 16, 16, generator=g)
    w = torch.randn(160, 128, 3, 3, generator=g) / (128 * 9) ** 0.5
    bias = torch.randn(160, generator=g)
    direct = _conv_and_grads(x, w, bias, winograd=False)
    assert not nnpack_calls
    fast = _conv_and_grads(x, w, bias, winograd=True)
    # the forward on x, and the input gradient: the output gradient (160 channels) convolved with w's adjoint
    assert nnpack_calls == [(2, 128, 16, 16), (2, 160, 16, 16)]
    for name, a, b in zip(("output", "input gradient", "weight gradient", "bias gradient"), fast, direct):
        assert not torch.equal(a, b) or "gradient" in name and "input" not in name, name  # other rounding
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4, name
    # the bias gradient is the output gradient summed over the batch and the map (a closed form; float32 sums of 512
    # values up to 1 in size)
    grad = torch.linspace(-1, 1, 2 * 160 * 16 * 16, dtype=torch.float64).reshape(2, 160, 16, 16)
    torch.testing.assert_close(fast[3].double(), grad.sum((0, 2, 3)), rtol=0, atol=1e-3)
    # an input that needs no gradient (a network's first layer): no input-gradient convolution
    nnpack_calls.clear()
    w_only = w.clone().requires_grad_(True)
    with winograd_convs():
        conv_same(x, w_only).sum().backward()
    assert nnpack_calls == [(2, 128, 16, 16)]
    w_direct = w.clone().requires_grad_(True)
    F.conv2d(x, w_direct, padding=1).sum().backward()
    torch.testing.assert_close(w_only.grad, w_direct.grad)  # the weight gradient is torch's own


@needs_nnpack
@pytest.mark.parametrize("shape, dtype", [
    (((2, 64, 16, 16), (128, 64, 3, 3)), torch.float32),  # too few input channels
    (((2, 128, 8, 8), (128, 128, 3, 3)), torch.float32),  # too small a map
    (((2, 128, 16, 16), (128, 128, 1, 1)), torch.float32),  # not 3×3
    (((2, 128, 16, 16), (128, 128, 3, 3)), torch.float64),  # not float32
])
def test_other_layers_run_the_direct_convolution_unchanged(shape, dtype, nnpack_calls):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape[0], generator=g, dtype=dtype), torch.randn(shape[1], generator=g, dtype=dtype)
    with winograd_convs():
        y = conv_same(x, w)
    assert not nnpack_calls
    assert torch.equal(y, F.conv2d(x, w, padding=w.shape[-1] // 2))


def test_without_nnpack_the_option_changes_nothing(monkeypatch: pytest.MonkeyPatch, nnpack_calls):
    monkeypatch.setattr(torch.backends.nnpack, "is_available", lambda: False)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 128, 16, 16, generator=g), torch.randn(128, 128, 3, 3, generator=g)
    with winograd_convs():
        assert torch.equal(conv_same(x, w), F.conv2d(x, w, padding=1))
    assert not nnpack_calls


@needs_nnpack
def test_a_distillation_with_winograd_equals_one_without_to_float_rounding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nnpack_calls):
    """The test teacher is small, so every 3×3 layer is made large enough here."""
    monkeypatch.setattr(edm_layers, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(edm_layers, "WINOGRAD_MIN_SIZE", 1)
    _one_process(tmp_path / "direct", "--steps", "2")
    assert not nnpack_calls
    _one_process(tmp_path / "winograd", "--steps", "2", "--winograd")
    assert nnpack_calls  # every pass of the loop: with and without gradients
    a, b = _state(tmp_path / "direct", 2), _state(tmp_path / "winograd", 2)
    assert a["config"]["winograd"] is False and b["config"]["winograd"] is True
    # Adam (β1 = 0) moves a weight by about lr·g/|g|, so where a gradient is near zero the algorithms' rounding
    # decides the move: the weights agree to a few percent of their move (a wrong convolution differs by O(1)), and
    # the second moments, (1 − β2)·g², to the rounding of the gradients.
    keys = sorted(TEACHER_WEIGHTS)
    start = _flat(TEACHER_WEIGHTS, keys)
    for net in ("generator", "fake", "ema"):
        direct, fast = _flat(a[net], keys), _flat(b[net], keys)
        assert float((fast - direct).norm() / (direct - start).norm()) < 5e-2, net
    for opt in ("opt_g", "opt_f"):
        v_a, v_b = (torch.cat([s["exp_avg_sq"].flatten() for s in x[opt]["state"].values()]) for x in (a, b))
        assert float((v_b - v_a).norm() / v_a.norm()) < 1e-3, opt


def test_a_run_where_it_cannot_apply_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.backends.nnpack, "is_available", lambda: False)
    result = CliRunner().invoke(cli, ["distill", *ARGS, "--out", str(tmp_path / "run"), "--steps", "1", "--winograd"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "--winograd changes nothing here" in result.output and "needs AVX2" in result.output


@needs_nnpack
def test_the_fake_scores_warm_up_steps_run_with_it_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        nnpack_calls):
    """--fake-warmup's steps run outside the loop's iterations; only they train in a run of 0 generator steps
    (sampling the grids afterwards does not use it)."""
    monkeypatch.setattr(edm_layers, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(edm_layers, "WINOGRAD_MIN_SIZE", 1)
    _one_process(tmp_path / "run", "--steps", "0", "--fake-warmup", "1", "--winograd")
    assert nnpack_calls
