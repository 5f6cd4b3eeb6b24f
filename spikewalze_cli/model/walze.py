"""The Walze: a causal depthwise convolution with short lags and grid-row lags."""

from __future__ import annotations

import math

import torch
from torch import nn


def walze_lags(kernel: int, width: int) -> list[int]:
    """Return the sorted lags of the Walze taps.

    The original layer is a 3x3 circular convolution over tokens laid out row-major on a grid
    of width W. Its causal reading keeps the short lags 0..k-1 (the current row) and the lags
    W-1, W and W+1 (the row above). Taps into the future are dropped. W = 0 keeps only the
    short lags, which is a plain causal convolution of size k.
    """
    lags = set(range(kernel))
    if width > 0:
        lags.update(lag for lag in (width - 1, width, width + 1) if lag >= 0)
    return sorted(lags)


class Walze(nn.Module):
    """Causal depthwise convolution: y[t, c] = sum_j weight[c, j] * x[t - lag_j, c].

    Input [B, T, C] -> output [B, T, C]. Positions before the start of the sequence count as
    zeros (left padding only), so y[t] depends on x[<= t] of the same sample and nothing else.
    The work is len(lags) multiply-adds per channel and token, done as a sum of shifted copies.
    """

    def __init__(self, dim: int, kernel: int, width: int, n_layer: int):
        super().__init__()
        self.lags = walze_lags(kernel, width)
        self.max_lag = max(self.lags)

        # Scale the taps so the output starts at the size of a GPT-2 residual projection:
        # std 0.02 * sqrt(C) / sqrt(2 * n_layer) for a unit-variance input.
        std = 0.02 * math.sqrt(dim / len(self.lags)) / math.sqrt(2 * n_layer)
        self.weight = nn.Parameter(torch.randn(dim, len(self.lags)) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        padded = nn.functional.pad(x, (0, 0, self.max_lag, 0))  # [B, max_lag + T, C]
        weight = self.weight.to(x.dtype)
        out = None
        for j, lag in enumerate(self.lags):
            start = self.max_lag - lag
            term = padded[:, start : start + T] * weight[:, j]
            out = term if out is None else out + term
        return out

    def init_state(self, batch_size: int, dim: int, device, dtype) -> torch.Tensor:
        """Return a zero ring buffer [B, max_lag, C] of past inputs (empty when max_lag is 0)."""
        return torch.zeros(batch_size, self.max_lag, dim, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, buffer: torch.Tensor, position: int) -> torch.Tensor:
        """Return the output for one token x [B, C] at `position` and store x in `buffer`.

        Slot `p % max_lag` of the ring buffer contains the input at position p. Slots of positions
        before 0 have never been written, so they still contain the zeros of the left padding.
        """
        weight = self.weight.to(x.dtype)
        out = x * weight[:, 0]  # lag 0 is always a tap because kernel >= 1
        for j, lag in enumerate(self.lags[1:], start=1):
            out = out + buffer[:, (position - lag) % self.max_lag] * weight[:, j]
        if self.max_lag > 0:
            buffer[:, position % self.max_lag] = x
        return out
