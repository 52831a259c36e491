"""--recompute-norms: the EDM U-Nets recompute their GroupNorm → SiLU (→ dropout) outputs in the backward; the
gradients are the stored path's bit for bit (dropout masks included) and the saved activations shrink."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from teachers.edm_layers import recompute_norms
from teachers.edm_precond import EDMPrecond
from tests.helpers import assert_same
from tests.test_distributed import _one_process, _state

SMALL = dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2], num_blocks=1,
             attn_resolutions=[8], dropout=0.2)


def _gradients(model_type: str, recompute: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients in the weights and the input of one train-mode pass (dropout on), and the bytes autograd saved."""
    torch.manual_seed(0)
    net = EDMPrecond(**SMALL, model_type=model_type).train()
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0])
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)  # the dropout masks
    with recompute_norms(recompute), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x, sigma)
    parameters = {n: p for n, p in net.named_parameters()}
    saved_weights = sum(p.untyped_storage().nbytes() for p in parameters.values()
                        if p.untyped_storage().data_ptr() in storages)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in parameters.items() if p.grad is not None}
    return {**grads, "input": x.grad}, sum(storages.values()) - saved_weights


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_recomputed_norms_give_the_same_gradients_from_fewer_saved_activations(model_type: str):
    stored, stored_bytes = _gradients(model_type, recompute=False)
    recomputed, recomputed_bytes = _gradients(model_type, recompute=True)
    assert stored.keys() == recomputed.keys() and len(stored) > 20
    for name in stored:
        assert torch.equal(stored[name], recomputed[name]), name
    assert recomputed_bytes < 0.8 * stored_bytes, (recomputed_bytes, stored_bytes)


def test_without_gradients_nothing_is_recomputed(monkeypatch: pytest.MonkeyPatch):
    """Passes without gradients (the teacher under inference, sampling) run plainly: nothing to store or recompute."""
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: pytest.fail("checkpoint called"))
    torch.manual_seed(0)
    net = EDMPrecond(**SMALL).eval()
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 3.0])
    with torch.no_grad():
        plain = net(x, sigma)
        with recompute_norms():
            assert torch.equal(net(x, sigma), plain)


@pytest.mark.parametrize("options", [(), ("--loss", "sid", "--teacher-mode", "train-shared-dropout")],
                         ids=["ikl", "sid-through-the-teachers-dropout"])
def test_a_distillation_with_recompute_norms_equals_one_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                options: tuple[str, ...]):
    """sid's generator gradient runs back through the teacher, which the official recipe runs in train mode (dropout
    on) and puts back into eval mode before that backward: the recomputation must use the dropout of the pass."""
    checkpoint, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    _one_process(tmp_path / "stored", "--steps", "2", "--dropout", "0.1", *options)
    assert not calls
    _one_process(tmp_path / "recomputed", "--steps", "2", "--dropout", "0.1", "--recompute-norms", *options)
    assert calls  # the loop's passes with gradients recomputed their norms
    a, b = _state(tmp_path / "stored", 2), _state(tmp_path / "recomputed", 2)
    assert b["config"]["recompute_norms"] is True
    assert_same({k: v for k, v in a.items() if k != "config"}, {k: v for k, v in b.items() if k != "config"})
