"""Parts both architectures share: the output record, embeddings, the head and the loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spikewalze_cli.config import ModelConfig
from spikewalze_cli.model.layers import make_norm

GATE_MODES = ("soft", "hard")


@dataclass
class ModelOutput:
    """Result of a forward pass.

    logits: [B, T, V]. loss: mean cross-entropy over targets != -100, or None without targets.
    aux_loss: spike-rate regularizer, already weighted (a 0-dim zero for the baseline).
    gates: [n_layer, B, T] gate values in [0, 1] (0/1 in hard mode), or None for the baseline.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    gates: torch.Tensor | None


class CausalLM(nn.Module):
    """Token embedding -> layers (subclass) -> final norm -> output projection to the vocabulary."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = make_norm(cfg.norm, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def num_parameters(self) -> int:
        """Return the number of distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_input(self, idx: torch.Tensor, gate_mode: str) -> None:
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [B, T], got {tuple(idx.shape)}")
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")

    def _output(self, x: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return logits [B, T, V] (float32) of hidden states x [B, T, C], and the loss for targets."""
        logits = self.head(self.norm(x)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss
