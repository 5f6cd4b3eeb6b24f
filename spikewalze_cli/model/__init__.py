"""Model package: the Spike-Walze language model, the GPT baseline and FLOP accounting.

`build_model(cfg, vocab_size)` returns either architecture; both share the API documented on
`SpikeWalzeLM` and `GPT` (forward -> ModelOutput, init_state/step, set_temperature,
set_gate_override, num_parameters).
"""

from __future__ import annotations

from torch import nn

from spikewalze_cli.config import ModelConfig, SpikeConfig
from spikewalze_cli.model.base import ModelOutput
from spikewalze_cli.model.gpt import GPT
from spikewalze_cli.model.spikewalze import SpikeWalzeLM

__all__ = ["GPT", "ModelOutput", "SpikeWalzeLM", "build_model", "describe_model", "gate_temperature"]


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """Return a freshly initialized model of `cfg.arch` for a vocabulary of `vocab_size` tokens."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if cfg.arch == "gpt":
        return GPT(cfg, vocab_size)
    return SpikeWalzeLM(cfg, vocab_size)


def gate_temperature(spike_cfg: SpikeConfig, progress: float) -> float:
    """Return the gate temperature at training `progress` in [0, 1] (clamped).

    The temperature falls geometrically from temperature_start to temperature_end, so every equal
    share of training divides it by the same factor.
    """
    progress = min(max(progress, 0.0), 1.0)
    return spike_cfg.temperature_start * (spike_cfg.temperature_end / spike_cfg.temperature_start) ** progress


def describe_model(model: nn.Module) -> str:
    """Return a one-line summary of a built model: architecture, shape and parameter counts."""
    cfg: ModelConfig = model.cfg
    total = model.num_parameters()
    embedding = model.embed.weight.numel()
    parts = [
        f"{cfg.arch}: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, mlp_ratio {cfg.mlp_ratio:g}",
    ]
    if cfg.arch == "spikewalze":
        parts.append(
            f"window {cfg.window}, Walze k={cfg.walze_kernel} W={cfg.walze_width}, "
            f"spike {cfg.spike.mode}/{cfg.spike.expert}"
        )
    parts.append(f"{total / 1e6:.2f}M parameters ({(total - embedding) / 1e6:.2f}M without the embedding)")
    return "; ".join(parts)
