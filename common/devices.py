"""The one check of a --device value, for every command."""

from __future__ import annotations

import torch

from common.errors import UserError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CPU; 'auto' -> CUDA when available, else CPU; a CUDA device this machine lacks is a UserError.
    The one check of a --device value, for every command."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {device} requested but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device
