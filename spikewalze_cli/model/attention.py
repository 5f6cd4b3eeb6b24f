"""The expert: causal local attention over the last `window` tokens, in O(T * window).

The blocked kernel splits the sequence into blocks of `window` positions. Every block's queries
attend to the keys of their own block and the block before (2 * window keys) under a banded mask,
which holds every key that a window of `window` tokens can reach. Scores are [blocks, window,
2 * window] per head, so memory and time grow linearly with T; no T x T matrix is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spikewalze_cli.model.layers import RotaryEmbedding, apply_rotary


def _key_blocks(x: torch.Tensor, window: int, n_blocks: int) -> torch.Tensor:
    """Cut keys or values [B, H, T, D] into overlapping blocks [B, n_blocks, H, 2 * window, D].

    Block i contains positions (i - 1) * window .. (i + 1) * window - 1; positions outside 0..T-1
    are zeros, which the banded mask never lets a real query see.
    """
    B, H, T, D = x.shape
    padded = F.pad(x, (0, 0, window, n_blocks * window - T))  # [B, H, (n_blocks + 1) * window, D]
    chunks = padded.view(B, H, n_blocks + 1, window, D)
    blocks = torch.cat((chunks[:, :, :-1], chunks[:, :, 1:]), dim=3)  # [B, H, n_blocks, 2w, D]
    return blocks.transpose(1, 2)


def banded_attention(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """Attend each query to the keys at positions q_pos - window + 1 .. q_pos.

    q: [B, n_blocks, H, m, D], the queries of each block (m <= window slots per block).
    q_pos: [B or 1, n_blocks, m], the absolute position of every query slot, inside its block.
    k, v: [B, H, T, D] for all positions. Returns [B, n_blocks, H, m, D].
    """
    n_blocks = q.shape[1]
    k_blocks = _key_blocks(k, window, n_blocks)
    v_blocks = _key_blocks(v, window, n_blocks)

    offsets = torch.arange(2 * window, device=q.device)
    k_pos = (torch.arange(n_blocks, device=q.device) - 1).unsqueeze(-1) * window + offsets  # [n_blocks, 2w]
    query = q_pos.unsqueeze(-1)  # [B, n_blocks, m, 1]
    mask = (k_pos[:, None, :] <= query) & (k_pos[:, None, :] > query - window) & (k_pos[:, None, :] >= 0)

    # Fold the blocks into the batch: SDPA is 4-D, and inductor's attention fusion breaks on 5-D.
    B, _, H, m, D = q.shape
    y = F.scaled_dot_product_attention(
        q.reshape(B * n_blocks, H, m, D),
        k_blocks.reshape(B * n_blocks, H, 2 * window, D),
        v_blocks.reshape(B * n_blocks, H, 2 * window, D),
        attn_mask=mask.expand(B, n_blocks, m, 2 * window).reshape(B * n_blocks, 1, m, 2 * window),
    )
    return y.view(B, n_blocks, H, m, D)


class LocalAttention(nn.Module):
    """Multi-head causal attention over a window of `window` tokens (the token itself included).

    Positions enter only through RoPE, so any length runs. `forward` computes every query;
    `forward_selected` computes queries only at the spiked positions (gather, compute, scatter)
    while keys and values exist for all positions. Inputs [B, T, C]; see each method for outputs.
    """

    def __init__(self, dim: int, n_head: int, window: int, rope_base: float, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.window = window
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj.is_residual_projection = True
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)
        self.dropout = nn.Dropout(dropout)

    def _keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return keys (rotated) and values [B, H, T, D] of all positions of x [B, T, C]."""
        B, T, C = x.shape
        k, v = self.kv_proj(x).view(B, T, 2, self.n_head, self.head_dim).unbind(dim=2)
        cos, sin = self.rotary.cos_sin(torch.arange(T, device=x.device))  # [T, D/2]
        k = apply_rotary(k, cos[:, None], sin[:, None])
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the attention output [B, T, C] for every position of x [B, T, C]."""
        B, T, C = x.shape
        w = self.window
        n_blocks = -(-T // w)
        k, v = self._keys_values(x)

        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        cos, sin = self.rotary.cos_sin(torch.arange(T, device=x.device))
        q = apply_rotary(q, cos[:, None], sin[:, None])
        q = F.pad(q, (0, 0, 0, 0, 0, n_blocks * w - T))  # [B, n_blocks * w, H, D]
        q = q.view(B, n_blocks, w, self.n_head, self.head_dim).transpose(2, 3)  # [B, n_blocks, H, w, D]
        q_pos = torch.arange(n_blocks * w, device=x.device).view(1, n_blocks, w)

        y = banded_attention(q, q_pos, k, v, w)  # [B, n_blocks, H, w, D]
        y = y.transpose(2, 3).reshape(B, n_blocks * w, C)[:, :T]
        return self.dropout(self.out_proj(y))

    def forward_selected(self, x: torch.Tensor, spiked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the attention output only where `spiked` [B, T] (bool) is set.

        Returns (rows, index): rows [N, C] are the outputs of the N spiked tokens and index [N]
        their row numbers in x.view(B * T, C). The query projection, the scores and the output
        projection run for those N tokens only. Each block packs its spiked queries into m slots,
        m being the largest count of any block, so the score work is m / window of the dense one.
        """
        B, T, C = x.shape
        w = self.window
        n_blocks = -(-T // w)

        # Slot of every spiked token: its block, and its rank among the spiked tokens of the block.
        flags = F.pad(spiked, (0, n_blocks * w - T)).view(B, n_blocks, w)
        rank = flags.cumsum(dim=-1) - 1
        m = int(flags.sum(dim=-1).max())  # NOTE: a host sync, and a graph break under torch.compile.
        flat = flags.reshape(-1).nonzero().squeeze(1)  # [N] indices into B * n_blocks * w
        sample, pos = flat // (n_blocks * w), flat % (n_blocks * w)
        block = pos // w
        slot = (sample * n_blocks + block) * m + rank.reshape(-1)[flat]
        index = sample * T + pos
        if m == 0:
            return x.new_zeros(0, C), index

        # Queries of the spiked tokens only, scattered into their slots.
        q = self.q_proj(x.reshape(B * T, C).index_select(0, index)).view(-1, self.n_head, self.head_dim)
        cos, sin = self.rotary.cos_sin(pos)  # [N, D/2]
        q = apply_rotary(q, cos[:, None], sin[:, None])
        q_slots = q.new_zeros(B * n_blocks * m, self.n_head, self.head_dim).index_copy(0, slot, q)
        q_slots = q_slots.view(B, n_blocks, m, self.n_head, self.head_dim).transpose(2, 3)

        # Empty slots take the last position of their block, so their mask row is never empty.
        block_end = (torch.arange(n_blocks, device=x.device) * w + w - 1).view(1, n_blocks, 1)
        q_pos = block_end.expand(B, n_blocks, m).reshape(-1).index_copy(0, slot, pos)
        q_pos = q_pos.view(B, n_blocks, m)

        k, v = self._keys_values(x)
        y = banded_attention(q_slots, q_pos, k, v, w)  # [B, n_blocks, H, m, D]
        y = y.transpose(2, 3).reshape(B * n_blocks * m, C).index_select(0, slot)
        return self.dropout(self.out_proj(y)), index

    def init_state(self, batch_size: int, device, dtype) -> dict[str, torch.Tensor]:
        """Return empty ring buffers for the last `window` keys and values, [B, H, window, D] each."""
        shape = (batch_size, self.n_head, self.window, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype), "v": torch.zeros(shape, device=device, dtype=dtype)}

    def step(
        self, x: torch.Tensor, cache: dict[str, torch.Tensor], position: int, spiked: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token x [B, C] at `position`.

        Stores its key and value at slot position % window for every sample, then attends for
        the spiked samples only. Returns (rows [N, C], index [N]) like `forward_selected`.
        """
        B, C = x.shape
        w = self.window
        positions = torch.full((1,), position, device=x.device)
        cos, sin = self.rotary.cos_sin(positions)  # [1, D/2]

        k, v = self.kv_proj(x).view(B, 2, self.n_head, self.head_dim).unbind(dim=1)
        cache["k"][:, :, position % w] = apply_rotary(k, cos, sin)
        cache["v"][:, :, position % w] = v

        index = spiked.nonzero().squeeze(1)
        if index.numel() == 0:
            return x.new_zeros(0, C), index
        q = self.q_proj(x.index_select(0, index)).view(-1, self.n_head, 1, self.head_dim)
        q = apply_rotary(q, cos, sin)
        filled = (torch.arange(w, device=x.device) <= position).view(1, w)  # unwritten slots stay masked
        y = F.scaled_dot_product_attention(
            q, cache["k"].index_select(0, index), cache["v"].index_select(0, index), attn_mask=filled
        )
        return self.out_proj(y.reshape(-1, C)), index
