"""FLOP accounting against torch.utils.flop_counter, and the work the hard gate really skips."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from spikewalze_cli.config import ModelConfig
from spikewalze_cli.model import build_model
from spikewalze_cli.model.flops import forward_flops_per_token, mean_keys_per_query

torch.set_num_threads(1)

VOCAB = 512
SEQ = 128
# Window 16 contains exactly 4 spikes at rate 0.25 and 8 at rate 0.5, so the packed queries fill
# their slots and the expert's work is exactly rate times the dense work.
SHAPE = dict(n_layer=2, n_head=2, d_model=64, context=SEQ, window=16, walze_kernel=3, walze_width=5)


def build(**spike) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**SHAPE, spike=spike), VOCAB).eval()


def count_flops(model: torch.nn.Module, gate_mode: str) -> FlopCounterMode:
    idx = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(idx, gate_mode=gate_mode)
    return counter


def test_mean_keys_per_query() -> None:
    assert mean_keys_per_query(5, 2) == pytest.approx((1 + 2 + 2 + 2 + 2) / 5)
    assert mean_keys_per_query(4, 8) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert mean_keys_per_query(4, None) == pytest.approx(2.5)


@pytest.mark.parametrize("expert", ["attention", "block"])
@pytest.mark.parametrize("gate_mode", ["soft", "hard"])
@pytest.mark.parametrize("mode, rate", [("always", 1.0), ("never", 0.0)])
def test_formula_matches_flop_counter(expert: str, gate_mode: str, mode: str, rate: float) -> None:
    model = build(mode=mode, expert=expert)
    counted = count_flops(model, gate_mode).get_total_flops() / (2 * SEQ)
    predicted = forward_flops_per_token(model.cfg, VOCAB, SEQ)
    assert predicted.actual == pytest.approx(counted, rel=0.10)
    assert predicted.actual == forward_flops_per_token(model.cfg, VOCAB, SEQ, spike_rate=rate).actual


def test_formula_scales_gated_work() -> None:
    cfg = ModelConfig(**SHAPE, spike={"expert": "block"})
    dense = forward_flops_per_token(cfg, VOCAB, SEQ)
    half = forward_flops_per_token(cfg, VOCAB, SEQ, spike_rate=0.5)
    none = forward_flops_per_token(cfg, VOCAB, SEQ, spike_rate=0.0)
    assert dense.dense == half.dense == none.dense == dense.actual
    # Keys and values are computed for every token once any token spikes.
    keys_values = 2 * 2 * 64 * 64 * SHAPE["n_layer"]
    assert half.actual - (none.actual + keys_values) == pytest.approx(0.5 * (dense.actual - (none.actual + keys_values)))


def test_gpt_projections_match_flop_counter() -> None:
    """FlopCounterMode (torch 2.13, CPU) does not count the fused causal SDPA kernel, so compare the rest."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**SHAPE, "window": SEQ}, arch="gpt"), VOCAB).eval()
    counted = count_flops(model, "soft").get_total_flops() / (2 * SEQ)
    predicted = forward_flops_per_token(model.cfg, VOCAB, SEQ)
    scores_values = SHAPE["n_layer"] * 2 * 2 * 64 * mean_keys_per_query(SEQ, None)
    assert predicted.actual - scores_values == pytest.approx(counted, rel=1e-9)
    assert predicted.dense == predicted.actual


def expert_flops(counter: FlopCounterMode, expert: str, n_layer: int) -> float:
    """Return the FLOPs the gate controls: everything in a layer but the key/value projection
    (and the feed-forward, unless the expert is the whole block)."""
    counts = counter.get_flop_counts()
    total = 0.0
    for i in range(n_layer):
        prefix = f"SpikeWalzeLM.layers.{i}"
        total += sum(counts.get(prefix, {}).values())
        total -= sum(counts.get(f"{prefix}.attn.kv_proj", {}).values())
        if expert == "attention":
            total -= sum(counts.get(f"{prefix}.mlp", {}).values())
    return total


@pytest.mark.parametrize("expert", ["attention", "block"])
def test_hard_gate_skips_unspiked_work(expert: str) -> None:
    # A forced gate bypasses the detector; mode always has none, so the formula matches the run.
    model = build(mode="always", expert=expert)
    model.set_gate_override(1.0)
    dense = expert_flops(count_flops(model, "hard"), expert, SHAPE["n_layer"])
    assert dense > 0
    for rate in (0.25, 0.5):
        model.set_gate_override(rate)
        counter = count_flops(model, "hard")
        assert expert_flops(counter, expert, SHAPE["n_layer"]) == pytest.approx(rate * dense, rel=1e-9)

        predicted = forward_flops_per_token(model.cfg, VOCAB, SEQ, spike_rate=rate).actual
        assert predicted == pytest.approx(counter.get_total_flops() / (2 * SEQ), rel=0.10)
