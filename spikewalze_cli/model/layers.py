"""Building blocks shared by both architectures: normalization, rotary positions, feed-forward."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalization over the last dimension with a learned gain.

    Input [..., C] -> output [..., C]. Every token is normalized on its own, so it never mixes
    samples or positions (unlike BatchNorm).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: str, dim: int) -> nn.Module:
    """Return the normalization layer named by `model.norm` ("rmsnorm" or "layernorm")."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) computed for any absolute positions on the fly.

    `cos_sin(positions)` takes integer positions of any shape [...] and returns cos and sin of
    shape [..., D/2] in float32. There is no table, so positions can grow without bound.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension of `x` [..., D] by the angles in cos/sin [..., D/2].

    cos and sin must broadcast against x[..., :D/2]; the result has the dtype of x.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


class MLP(nn.Module):
    """Feed-forward block: Linear(C, hidden) -> GELU -> Linear(hidden, C). Input [..., C] -> [..., C]."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


def mlp_hidden(dim: int, mlp_ratio: float) -> int:
    """Return the feed-forward width for `mlp_ratio` (0 when the ratio removes the block)."""
    return int(round(dim * mlp_ratio))


def init_weights(module: nn.Module, n_layer: int) -> None:
    """Initialize like GPT-2: normal(0, 0.02) weights, zero biases, and residual projections
    (marked with `is_residual_projection`) scaled down by sqrt(2 * n_layer)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            std = 0.02
            if getattr(sub, "is_residual_projection", False):
                std = 0.02 / math.sqrt(2 * n_layer)
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=0.02)
