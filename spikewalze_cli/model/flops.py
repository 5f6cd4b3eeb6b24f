"""Forward FLOPs per token from a config: dense (every token spikes) and at a measured spike rate.

A matrix product of [m, k] by [k, n] counts 2 * m * k * n FLOPs. Normalization, activations,
softmax and RoPE are left out, as `torch.utils.flop_counter` leaves them out. The Walze is counted
as one multiply-add per tap, channel and token.

Attention counts the key positions a query really needs: min(t + 1, window) for local attention
and t + 1 for full causal attention, averaged over the positions t of a sequence.
NOTE: the kernels do more than that. The blocked local kernel scores 2 * window keys per query
and masks about half of them. Causal SDPA without a mask scores whole tiles across the diagonal;
FlopCounterMode (torch 2.13 on CPU) does not count that fused kernel at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from spikewalze_cli.config import ModelConfig
from spikewalze_cli.model.layers import mlp_hidden
from spikewalze_cli.model.walze import walze_lags


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token: `dense` with the expert on for every token, `actual` at the spike rate."""

    dense: float
    actual: float


def mean_keys_per_query(seq_len: int, window: int | None) -> float:
    """Return the mean over t = 0..seq_len-1 of the keys query t attends to: min(t + 1, window)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # Positions 0..window-1 see 1..window keys; the remaining ones see `window` keys each.
    ramp = window * (window + 1) / 2
    return (ramp + (seq_len - window) * window) / seq_len


def forward_flops_per_token(
    cfg: ModelConfig, vocab_size: int, seq_len: int, spike_rate: float | None = None
) -> FlopCount:
    """Return forward FLOPs per token for a sequence of `seq_len` tokens.

    spike_rate is the measured fraction of tokens that run the expert. None means the rate the
    config implies: 1 for spike.mode learned and always, 0 for never. The baseline has no gate,
    so its dense and actual counts are equal.
    NOTE: with spike.mode learned the detector is counted, even for a run under
    `set_gate_override`, which skips it.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    C = cfg.d_model
    hidden = mlp_hidden(C, cfg.mlp_ratio)
    mlp = 2 * 2 * C * hidden
    head = 2 * C * vocab_size

    if cfg.arch == "gpt":
        attention = 2 * 4 * C * C + 2 * 2 * C * mean_keys_per_query(seq_len, None)
        total = head + cfg.n_layer * (attention + mlp)
        return FlopCount(dense=float(total), actual=float(total))

    spike = cfg.spike
    if spike_rate is None:
        spike_rate = 0.0 if spike.mode == "never" else 1.0
    if not 0.0 <= spike_rate <= 1.0:
        raise ValueError(f"spike_rate must lie in [0, 1], got {spike_rate}")

    walze = 2 * C * len(walze_lags(cfg.walze_kernel, cfg.walze_width))
    detector = 2 * (2 * C * spike.detector_hidden + spike.detector_hidden) if spike.mode == "learned" else 0
    keys_values = 2 * 2 * C * C  # for every token while any token spikes
    # Gated per spiked token: query and output projections, scores and weighted values.
    gated = 2 * 2 * C * C + 2 * 2 * C * mean_keys_per_query(seq_len, cfg.window)
    ungated = walze + detector
    if spike.expert == "block":
        gated += mlp
    else:
        ungated += mlp

    def layer(rate: float) -> float:
        return ungated + (keys_values if rate > 0 else 0) + rate * gated

    return FlopCount(dense=float(head + cfg.n_layer * layer(1.0)), actual=float(head + cfg.n_layer * layer(spike_rate)))
