"""The spike detector and the gate that routes tokens to the expert."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SpikeDetector(nn.Module):
    """Small MLP that scores how much a token needs the expert.

    Input: the normalized hidden state before the Walze and the Walze output, both [..., C].
    Output: the gate probability sigmoid((logit - threshold) / temperature), shape [...].
    The threshold is learned. It starts where the gate equals `target_rate` at the start
    temperature, so training begins at the requested spike rate. The detector scores one token at
    a time, so its only history is what the causal Walze already mixed in.
    """

    def __init__(self, dim: int, hidden: int, target_rate: float, temperature_start: float):
        super().__init__()
        self.fc = nn.Linear(2 * dim, hidden)
        self.out = nn.Linear(hidden, 1)
        rate = min(max(target_rate, 0.01), 0.99)
        self.threshold = nn.Parameter(torch.tensor(temperature_start * math.log((1 - rate) / rate)))

    def logit(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.fc(torch.cat((before, after), dim=-1)))
        return self.out(hidden).squeeze(-1)

    def forward(self, before: torch.Tensor, after: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        logit = self.logit(before, after).float()
        return torch.sigmoid((logit - self.threshold) / temperature)


def forced_gate(positions: torch.Tensor, rate: float) -> torch.Tensor:
    """Return a 0/1 gate of the shape of `positions` that spikes a fraction `rate` of positions.

    Position t spikes when floor((t + 1) * rate) > floor(t * rate), so spikes are spread evenly,
    each depends only on its own position (causal, and the same in decoding), and rate 0 and 1
    give exactly none and all.
    """
    t = positions.to(torch.float64)
    spiked = torch.floor((t + 1) * rate) > torch.floor(t * rate)
    return spiked.to(torch.float32)
