"""Device selection shared by training, evaluation and generation."""

from __future__ import annotations

import torch

from spikewalze_cli.errors import UserError


def resolve_device(name: str, key: str) -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a device; `key` names the config key in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"invalid {key} {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} is {name!r} but PyTorch sees no CUDA GPU; use {key}=cpu or auto")
    return device
