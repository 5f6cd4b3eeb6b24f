"""The baseline: a standard pre-norm decoder-only Transformer with full causal attention and RoPE."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spikewalze_cli.config import ModelConfig
from spikewalze_cli.model.base import CausalLM, ModelOutput
from spikewalze_cli.model.layers import MLP, RotaryEmbedding, apply_rotary, init_weights, make_norm, mlp_hidden


class CausalSelfAttention(nn.Module):
    """Multi-head attention over all previous tokens. Input [B, T, C] -> output [B, T, C]."""

    def __init__(self, dim: int, n_head: int, rope_base: float, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj.is_residual_projection = True
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)
        self.dropout = nn.Dropout(dropout)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return rotated q, k and v [B, H, T, D] of x [B, T, C] at `positions` [T]."""
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.n_head, self.head_dim).unbind(dim=2)
        cos, sin = self.rotary.cos_sin(positions)
        q = apply_rotary(q, cos[:, None], sin[:, None])
        k = apply_rotary(k, cos[:, None], sin[:, None])
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x, torch.arange(T, device=x.device))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dropout(self.out_proj(y.transpose(1, 2).reshape(B, T, C)))

    def step(self, x: torch.Tensor, cache: dict[str, torch.Tensor], position: int) -> torch.Tensor:
        """Decode one token x [B, C]; append its key and value to the growing cache [B, H, t, D]."""
        B, C = x.shape
        q, k, v = self._qkv(x.unsqueeze(1), torch.full((1,), position, device=x.device))
        cache["k"] = torch.cat((cache["k"], k), dim=2)
        cache["v"] = torch.cat((cache["v"], v), dim=2)
        y = F.scaled_dot_product_attention(q, cache["k"], cache["v"])  # the one query attends to every cached key
        return self.out_proj(y.reshape(B, C))


class GPTBlock(nn.Module):
    """x = x + attention(norm1(x)); x = x + mlp(norm2(x)). Input [B, T, C] -> output [B, T, C]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head, cfg.rope_base, cfg.dropout)
        hidden = mlp_hidden(cfg.d_model, cfg.mlp_ratio)
        self.norm2 = make_norm(cfg.norm, cfg.d_model) if hidden > 0 else None
        self.mlp = MLP(cfg.d_model, hidden, cfg.dropout) if hidden > 0 else None

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._feed_forward(x + self.attn(self.norm1(x)))

    def step(self, x: torch.Tensor, cache: dict[str, torch.Tensor], position: int) -> torch.Tensor:
        return self._feed_forward(x + self.attn.step(self.norm1(x), cache, position))


@dataclass
class GPTState:
    """Decoding state: the next position and a growing key/value cache [B, H, t, D] per layer."""

    position: int = 0
    layers: list[dict[str, torch.Tensor]] = field(default_factory=list)


class GPT(CausalLM):
    """Baseline language model with the same API as SpikeWalzeLM. idx [B, T] -> ModelOutput."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.layers = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layer))
        init_weights(self, cfg.n_layer)

    def set_temperature(self, t: float) -> None:
        """Accept and ignore the gate temperature: the baseline has no gate."""

    def set_gate_override(self, rate: float | None) -> None:
        """Accept and ignore a gate override: every token runs full attention."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, gate_mode: str = "soft") -> ModelOutput:
        """Run idx [B, T] through all layers; gate_mode is accepted for the shared API and ignored."""
        self._check_input(idx, gate_mode)
        x = self.drop(self.embed(idx))
        for layer in self.layers:
            x = layer(x)
        logits, loss = self._output(x, targets)
        return ModelOutput(logits=logits, loss=loss, aux_loss=x.new_zeros((), dtype=torch.float32), gates=None)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> GPTState:
        dtype = self.embed.weight.dtype
        shape = (batch_size, self.cfg.n_head, 0, self.cfg.d_model // self.cfg.n_head)
        caches = [
            {"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype)}
            for _ in self.layers
        ]
        return GPTState(0, caches)

    @torch.no_grad()
    def step(self, idx_t: torch.Tensor, state: GPTState) -> tuple[torch.Tensor, GPTState, None]:
        """Decode one token per sample, idx_t [B]. Returns logits [B, V], the state and None (no gates)."""
        x = self.embed(idx_t)
        for layer, cache in zip(self.layers, state.layers):
            x = layer.step(x, cache, state.position)
        state.position += 1
        return self.head(self.norm(x)).float(), state, None
