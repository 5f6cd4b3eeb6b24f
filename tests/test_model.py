"""Tests of the model package: causality, decoding, hard versus soft gate, sizes and dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spikewalze_cli.config import ModelConfig, load_config
from spikewalze_cli.model import build_model, describe_model, gate_temperature

torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB = 97
# Window 8 and grid width 5 (lags 0, 1, 2, 4, 5, 6) are both much shorter than the test sequences.
SMALL = dict(n_layer=2, n_head=2, d_model=32, context=64, window=8, walze_kernel=3, walze_width=5)


def make_model(arch: str = "spikewalze", shape: dict | None = None, **spike) -> torch.nn.Module:
    """Build a small fp32 model; a learned detector is made decisive so hard mode spikes about half."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, **{**SMALL, **(shape or {})}, spike=spike), VOCAB)
    if arch == "spikewalze" and model.cfg.spike.mode == "learned":
        with torch.no_grad():
            for layer in model.layers:
                layer.detector.out.weight.normal_(0.0, 3.0)
                layer.detector.threshold.zero_()
    return model


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


@pytest.mark.parametrize("arch", ["spikewalze", "gpt"])
@pytest.mark.parametrize("gate_mode", ["soft", "hard"])
@pytest.mark.parametrize("training", [True, False])
def test_logits_are_causal(arch: str, gate_mode: str, training: bool) -> None:
    model = make_model(arch)
    model.train(training)
    idx = tokens(2, 45)
    for t in (0, 7, 20, 38):
        changed = idx.clone()
        changed[:, t + 1 :] = tokens(2, 45 - t - 1, seed=t + 100)
        with torch.no_grad():
            before = model(idx, gate_mode=gate_mode)
            after = model(changed, gate_mode=gate_mode)
        assert torch.allclose(before.logits[:, : t + 1], after.logits[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(before.logits[:, t + 1 :], after.logits[:, t + 1 :])
        if arch == "spikewalze":
            assert torch.equal(before.gates[:, :, : t + 1], after.gates[:, :, : t + 1])


def test_hard_gate_spikes_some_tokens() -> None:
    """The causality and decoding tests only mean something if hard mode mixes both paths."""
    with torch.no_grad():
        gates = make_model()(tokens(2, 45), gate_mode="hard").gates
    assert set(gates.unique().tolist()) == {0.0, 1.0}
    assert 0.2 < gates.mean().item() < 0.8


def test_samples_are_independent() -> None:
    model = make_model(expert="block")
    idx = tokens(3, 30)
    with torch.no_grad():
        batch = model(idx, gate_mode="hard").logits
        single = model(idx[1:2], gate_mode="hard").logits
    assert torch.allclose(batch[1:2], single, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "arch, spike, override",
    [
        ("spikewalze", {}, None),
        ("spikewalze", {"expert": "block"}, None),
        ("spikewalze", {"mode": "always"}, None),
        ("spikewalze", {"mode": "never", "expert": "block"}, None),
        ("spikewalze", {"expert": "block"}, 0.3),
        ("gpt", {}, None),
    ],
)
def test_step_matches_forward(arch: str, spike: dict, override: float | None) -> None:
    model = make_model(arch, **spike).eval()
    model.set_gate_override(override)
    idx = tokens(2, 3 * SMALL["window"] + 7)
    with torch.no_grad():
        full = model(idx, gate_mode="hard")

    state = model.init_state(2, "cpu")
    for t in range(idx.shape[1]):
        logits, state, gates = model.step(idx[:, t], state)
        assert torch.allclose(logits, full.logits[:, t], rtol=0, atol=1e-4), f"position {t}"
        if arch == "spikewalze":
            assert torch.equal(gates, full.gates[:, :, t])
        else:
            assert gates is None


@pytest.mark.parametrize(
    "shape",
    [
        {"mlp_ratio": 0.0},
        {"walze_kernel": 1, "walze_width": 0},
        {"walze_kernel": 4, "walze_width": 2},
        {"norm": "layernorm", "tie_embeddings": False},
        {"window": 1},
    ],
)
def test_step_matches_forward_variants(shape: dict) -> None:
    model = make_model(shape=shape, expert="block").eval()
    idx = tokens(2, 27)
    with torch.no_grad():
        full = model(idx, gate_mode="hard")
    state = model.init_state(2, "cpu")
    for t in range(idx.shape[1]):
        logits, state, gates = model.step(idx[:, t], state)
        assert torch.allclose(logits, full.logits[:, t], rtol=0, atol=1e-4), f"position {t}"
        assert torch.equal(gates, full.gates[:, :, t])


@pytest.mark.parametrize("length", [1, 7, 8, 9])
def test_short_sequences_run(length: int) -> None:
    model = make_model()
    for gate_mode in ("soft", "hard"):
        with torch.no_grad():
            out = model(tokens(2, length), gate_mode=gate_mode)
        assert out.logits.shape == (2, length, VOCAB)
        assert torch.isfinite(out.logits).all()


def test_dropout_only_in_training() -> None:
    model = make_model(shape={"dropout": 0.2})
    idx = tokens(2, 20)
    with torch.no_grad():
        first, second = model(idx).logits, model(idx).logits
        model.eval()
        third, fourth = model(idx).logits, model(idx).logits
    assert not torch.equal(first, second)
    assert torch.equal(third, fourth)


def state_numel(state) -> int:
    return sum(tensor.numel() for layer in state.layers for tensor in layer.values())


def test_decoding_state_size_is_fixed() -> None:
    model = make_model().eval()
    state = model.init_state(2, "cpu")
    sizes = []
    for t in range(40):
        _, state, _ = model.step(tokens(2, 1, seed=t)[:, 0], state)
        sizes.append(state_numel(state))
    assert state.position == 40
    assert len(set(sizes)) == 1
    # Walze ring buffer: max lag 6 inputs of width 32; keys and values: 8 positions of width 32.
    assert sizes[0] == 2 * 2 * (6 * 32 + 2 * 8 * 32)


def test_gpt_cache_grows() -> None:
    model = make_model("gpt").eval()
    state = model.init_state(1, "cpu")
    for t in range(5):
        _, state, _ = model.step(tokens(1, 1, seed=t)[:, 0], state)
    assert state.layers[0]["k"].shape == (1, 2, 5, 16)


@pytest.mark.parametrize("expert", ["attention", "block"])
@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_hard_equals_soft_at_forced_gate(expert: str, rate: float) -> None:
    model = make_model(expert=expert)
    model.set_gate_override(rate)
    idx = tokens(2, 30)
    with torch.no_grad():
        soft = model(idx, gate_mode="soft")
        hard = model(idx, gate_mode="hard")
    assert torch.all(soft.gates == rate)
    assert torch.equal(soft.gates, hard.gates)
    assert torch.allclose(soft.logits, hard.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode, rate", [("always", 1.0), ("never", 0.0)])
def test_fixed_modes_equal_forced_gate(mode: str, rate: float) -> None:
    model = make_model(mode=mode, expert="block")
    idx = tokens(2, 30)
    with torch.no_grad():
        soft = model(idx, gate_mode="soft")
        hard = model(idx, gate_mode="hard")
        model.set_gate_override(rate)
        forced = model(idx, gate_mode="soft")
    assert torch.all(soft.gates == rate)
    assert torch.allclose(soft.logits, hard.logits, rtol=0, atol=1e-5)
    assert torch.equal(soft.logits, forced.logits)
    assert soft.aux_loss.item() == 0.0


def test_gate_override_spreads_spikes() -> None:
    model = make_model()
    model.set_gate_override(0.25)
    with torch.no_grad():
        gates = model(tokens(1, 16), gate_mode="hard").gates
    assert gates[0, 0].tolist() == [0, 0, 0, 1] * 4
    model.set_gate_override(None)
    assert model.gate_override is None
    with pytest.raises(ValueError):
        model.set_gate_override(1.5)


def test_soft_forward_trains_every_part() -> None:
    model = make_model(expert="block")
    idx = tokens(2, 30)
    out = model(idx[:, :-1], idx[:, 1:])
    assert out.logits.shape == (2, 29, VOCAB)
    assert out.gates.shape == (2, 2, 29)
    assert out.gates.min() > 0.0
    assert out.gates.max() < 1.0
    (out.loss + out.aux_loss).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["spikewalze", "gpt"])
def test_invalid_input_raises(arch: str) -> None:
    model = make_model(arch)
    with pytest.raises(ValueError, match="gate_mode"):
        model(tokens(1, 4), gate_mode="sharp")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(tokens(1, 4)[0])


def test_loss_ignores_masked_targets() -> None:
    model = make_model()
    idx = tokens(1, 12)
    targets = idx.clone()
    targets[:, 6:] = -100
    with torch.no_grad():
        out = model(idx, targets)
        expected = torch.nn.functional.cross_entropy(out.logits[0, :6], idx[0, :6])
    assert torch.allclose(out.loss, expected)


def test_rate_loss_pulls_toward_target() -> None:
    model = make_model(target_rate=0.3, rate_loss_weight=2.0)
    with torch.no_grad():
        out = model(tokens(2, 20))
    per_layer = out.gates.mean(dim=(1, 2))
    expected = 2.0 * ((per_layer - 0.3) ** 2).mean()
    assert torch.allclose(out.aux_loss, expected)
    assert make_model("gpt")(tokens(1, 5)).aux_loss.item() == 0.0


def test_fresh_detector_starts_at_target_rate() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, spike={"target_rate": 0.2}), VOCAB)
    with torch.no_grad():
        gates = model(tokens(2, 30)).gates
    assert abs(gates.mean().item() - 0.2) < 0.02


def test_temperature_sharpens_gate() -> None:
    model = make_model()
    idx = tokens(2, 30)
    with torch.no_grad():
        model.set_temperature(1.0)
        warm = model(idx).gates
        model.set_temperature(0.1)
        cold = model(idx).gates
    assert (cold - 0.5).abs().mean() > (warm - 0.5).abs().mean()
    # The first layer's input does not depend on the temperature, so only the gate's sharpness
    # changes there: the side of 0.5 is the sign of logit - threshold.
    assert torch.equal(warm[0] >= 0.5, cold[0] >= 0.5)


def test_gate_temperature_schedule() -> None:
    spike = ModelConfig().spike
    assert gate_temperature(spike, 0.0) == pytest.approx(1.0)
    assert gate_temperature(spike, 0.5) == pytest.approx(0.1**0.5)
    assert gate_temperature(spike, 1.0) == pytest.approx(0.1)
    assert gate_temperature(spike, 2.0) == pytest.approx(0.1)


def test_walze_has_expected_lags() -> None:
    model = make_model()
    walze = model.layers[0].walze
    assert walze.lags == [0, 1, 2, 4, 5, 6]
    x = torch.zeros(1, 12, 32)
    x[0, 3] = 1.0  # an impulse at position 3 reaches positions 3 + lag only
    y = walze(x)
    touched = y[0].abs().sum(dim=-1).nonzero().squeeze(1).tolist()
    assert touched == [3, 4, 5, 7, 8, 9]


@pytest.mark.parametrize("name, low, high", [("tiny", 1e6, 5e6), ("small", 15e6, 25e6), ("base", 80e6, 130e6)])
def test_config_sizes(name: str, low: float, high: float) -> None:
    config = load_config(CONFIGS / f"{name}.yaml")
    with torch.device("meta"):
        model = build_model(config.model, config.tokenizer.vocab_size)
    assert low <= model.num_parameters() <= high
    assert f"{model.num_parameters() / 1e6:.2f}M parameters" in describe_model(model)


def test_tied_embedding_counts_once() -> None:
    tied = build_model(ModelConfig(**SMALL), VOCAB)
    untied = build_model(ModelConfig(**SMALL, tie_embeddings=False), VOCAB)
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * SMALL["d_model"]


@pytest.mark.parametrize("arch", ["spikewalze", "gpt"])
@pytest.mark.parametrize("gate_mode", ["soft", "hard"])
def test_bf16_autocast_runs(arch: str, gate_mode: str) -> None:
    model = make_model(arch, expert="block")
    idx = tokens(2, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx[:, :-1], idx[:, 1:], gate_mode=gate_mode)
    (out.loss + out.aux_loss).backward()
    with torch.no_grad():
        reference = model(idx[:, :-1], idx[:, 1:], gate_mode=gate_mode).loss
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - reference.item()) < 0.05


@pytest.mark.parametrize("arch", ["spikewalze", "gpt"])
def test_bf16_autocast_step_matches_forward(arch: str) -> None:
    model = make_model(arch, expert="block").eval()
    idx = tokens(2, 20)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(idx, gate_mode="hard").logits
        state = model.init_state(2, "cpu")
        for t in range(idx.shape[1]):
            logits, state, _ = model.step(idx[:, t], state)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, full[:, -1], rtol=0, atol=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["spikewalze", "gpt"])
def test_compiled_model_matches_eager(arch: str) -> None:
    model = make_model(arch)
    idx = tokens(2, 30)
    compiled = torch.compile(model)
    out = compiled(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    with torch.no_grad():
        eager = model(idx[:, :-1], idx[:, 1:])
    assert torch.allclose(out.logits, eager.logits, rtol=0, atol=1e-4)
