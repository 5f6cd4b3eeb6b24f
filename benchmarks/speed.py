"""Speed benchmarks on random token ids: training step, generation, hard gate, MFU, baseline check.

Each function builds the models it compares in one process, times them alternately with the same
inputs and returns a `Section` with the table, the targets and their profiles. Weights are random:
speed does not depend on what a model has learned, except through its spike rate, which these
benchmarks force with `set_gate_override` where it matters.
"""

from __future__ import annotations

import copy
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    Section,
    Target,
    Timing,
    markdown_table,
    measure,
    measure_interleaved,
    profile_table,
    tensor_nbytes,
    timing_of,
)
from benchmarks.plots import plot_lines
from spikewalze_cli.config import ModelConfig
from spikewalze_cli.model import build_model
from spikewalze_cli.model.flops import forward_flops_per_token

logger = logging.getLogger(__name__)

# The variants every comparison shows: Spike-Walze with its learned gate and the two ablations,
# and the full-attention baseline.
VARIANTS = ("learned", "always", "never", "gpt")


def variant_config(base: ModelConfig, variant: str, **changes) -> ModelConfig:
    """Return `base` as the given variant: a Spike-Walze gate mode or the `gpt` baseline."""
    data = base.model_dump()
    data.update(changes)
    if variant == "gpt":
        data["arch"] = "gpt"
    else:
        data["arch"] = "spikewalze"
        data["spike"] = {**data["spike"], "mode": variant}
    return ModelConfig.model_validate(data)


def random_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def make_train_step(cfg: ModelConfig, vocab_size: int, batch_size: int, seq_len: int) -> Callable[[], None]:
    """Build a model, an AdamW optimizer and a batch, and return one forward+backward+update step."""
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx, targets = random_batch(vocab_size, batch_size, seq_len)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(idx, targets)
        (out.loss + out.aux_loss).backward()
        optimizer.step()

    return step


def release() -> None:
    gc.collect()


# ----------------------------------------------------------------------------------------------
# a. Training step cost per token against sequence length


def bench_train_step(
    base: ModelConfig, vocab_size: int, seq_lens: list[int], batch_tokens: int, repeats: int, img_dir: Path
) -> Section:
    """Time forward+backward+AdamW per token at each T with B = batch_tokens / T sequences.

    All models at all lengths take turns in every repeat, so a change in machine load during the
    section shifts every figure alike instead of one length's.
    """
    steps: dict[str, Callable[[], None]] = {}
    for seq_len in seq_lens:
        batch_size = max(1, batch_tokens // seq_len)
        for variant in VARIANTS:
            cfg = variant_config(base, variant, context=seq_len)
            steps[f"{variant}@{seq_len}"] = make_train_step(cfg, vocab_size, batch_size, seq_len)
    timings = measure_interleaved(steps, repeats=repeats, warmup=1)

    per_token: dict[str, dict[int, Timing]] = {variant: {} for variant in VARIANTS}
    for seq_len in seq_lens:
        tokens = max(1, batch_tokens // seq_len) * seq_len
        for variant in VARIANTS:
            timing = timings[f"{variant}@{seq_len}"]
            per_token[variant][seq_len] = timing.scaled(1.0 / tokens)
            logger.info("train step %s T=%d: %.3f s", variant, seq_len, timing.median)
    learned_steps = {seq_len: steps[f"learned@{seq_len}"] for seq_len in seq_lens}  # for the profiles of misses
    del steps
    release()

    rows = []
    for seq_len in seq_lens:
        gpt = per_token["gpt"][seq_len].median
        row = [seq_len, max(1, batch_tokens // seq_len)]
        row += [per_token[variant][seq_len].format_us() for variant in VARIANTS]
        row.append(f"{gpt / per_token['learned'][seq_len].median:.2f}")
        rows.append(row)
    header = ["T", "B", *(f"{v} µs/token (IQR)" for v in VARIANTS), "gpt / learned"]
    table = markdown_table(header, rows)

    plot = "bench-train-step.png"
    plot_lines(
        img_dir / plot,
        {variant: (seq_lens, [per_token[variant][t].median * 1e6 for t in seq_lens]) for variant in VARIANTS},
        xlabel="sequence length T (tokens)",
        ylabel="training step time per token (µs)",
        title=f"Training step cost per token, {batch_tokens} tokens per batch",
        logx=True,
    )

    profiles: dict[int, str] = {}

    def profile_step(variant: str, seq_len: int) -> str:
        if seq_len not in profiles:
            profiles[seq_len] = profile_table(learned_steps[seq_len])
        return profiles[seq_len]

    targets = []
    short, long = seq_lens[0], seq_lens[-1]
    growth = per_token["learned"][long].median / per_token["learned"][short].median
    passed = growth <= 1.3
    targets.append(
        Target(
            f"a. learned cost per token at T={long} vs T={short}",
            "at most 1.3x",
            f"{growth:.2f}x",
            passed,
            None if passed else profile_step("learned", long),
        )
    )
    for seq_len, minimum in ((256, 0.9), (4096, 1.5), (16384, 2.5)):
        if seq_len not in seq_lens:
            continue
        speedup = per_token["gpt"][seq_len].median / per_token["learned"][seq_len].median
        passed = speedup >= minimum
        targets.append(
            Target(
                f"a. learned speed vs gpt at T={seq_len}",
                f"at least {minimum}x",
                f"{speedup:.2f}x",
                passed,
                None if passed else profile_step("learned", seq_len),
            )
        )

    return Section(
        key="train_step",
        title="a. Training step cost per token against sequence length",
        description=(
            f"One forward+backward+AdamW step on random token ids, {batch_tokens} tokens per batch at every T "
            f"(B = {batch_tokens} / T), median over {repeats} steps after one warm-up step, all models at all lengths "
            "taking turns; in brackets the interquartile range. `learned`, `always` and `never` are Spike-Walze gate modes (soft gate, as in "
            "training); `gpt` is the full-attention baseline of the same size."
        ),
        table=table,
        plots=[plot],
        targets=targets,
        data={v: {t: per_token[v][t].median for t in seq_lens} for v in VARIANTS},
    )


# ----------------------------------------------------------------------------------------------
# b. Generation: time and state memory per token against position


def bench_generation(
    base: ModelConfig, vocab_size: int, positions: list[int], timed_steps: int, spike_rate: float, img_dir: Path
) -> Section:
    """Step one sequence to each position and copy its state there, then time single-token steps.

    The timed steps take turns over all models and positions, so drift in machine load hits all alike.
    """
    # Room for the timed steps after the last position and the 8 profiled steps after those.
    length = positions[-1] + timed_steps + 8
    configs = {"spikewalze": variant_config(base, "learned", context=length), "gpt": variant_config(base, "gpt", context=length)}
    generator = torch.Generator().manual_seed(1)
    stream = torch.randint(0, vocab_size, (length,), generator=generator)
    models = {}
    states: dict[tuple[str, int], Any] = {}  # (model, position) -> decoding state after `position` tokens
    state_bytes: dict[str, dict[int, int]] = {name: {} for name in configs}

    with torch.no_grad():
        for name, cfg in configs.items():
            torch.manual_seed(0)
            model = build_model(cfg, vocab_size).eval()
            if name == "spikewalze":
                model.set_gate_override(spike_rate)
            models[name] = model
            state = model.init_state(1, torch.device("cpu"))
            position = 0
            for target in positions:
                while position < target:
                    _, state, _ = model.step(stream[position : position + 1], state)
                    position += 1
                states[(name, target)] = copy.deepcopy(state)
                state_bytes[name][target] = tensor_nbytes(state)
            logger.info("generation: %s stepped to position %d", name, position)

        samples: dict[tuple[str, int], list[float]] = {key: [] for key in states}
        for offset in range(timed_steps):
            for (name, position), state in states.items():
                token = stream[position + offset : position + offset + 1]
                start = time.perf_counter()
                _, states[(name, position)], _ = models[name].step(token, state)
                samples[(name, position)].append(time.perf_counter() - start)
    seconds = {name: {p: timing_of(samples[(name, p)]) for p in positions} for name in configs}

    def profile_last(name: str) -> str:
        def run() -> None:
            with torch.no_grad():
                state = states[(name, positions[-1])]
                for offset in range(timed_steps, timed_steps + 8):
                    token = stream[positions[-1] + offset : positions[-1] + offset + 1]
                    _, state, _ = models[name].step(token, state)

        return profile_table(run)

    rows = []
    for position in positions:
        rows.append(
            [
                position,
                seconds["spikewalze"][position].format_ms(),
                f"{state_bytes['spikewalze'][position] / 1024:.1f}",
                seconds["gpt"][position].format_ms(),
                f"{state_bytes['gpt'][position] / 1024:.1f}",
                f"{seconds['gpt'][position].median / seconds['spikewalze'][position].median:.2f}",
            ]
        )
    header = ["position", "spikewalze ms/token (IQR)", "spikewalze state KiB", "gpt ms/token (IQR)", "gpt KV cache KiB", "gpt / spikewalze time"]
    table = markdown_table(header, rows)

    plot = "bench-generation.png"
    plot_lines(
        img_dir / plot,
        {name: (positions, [seconds[name][p].median * 1e3 for p in positions]) for name in configs},
        xlabel="position (tokens already in the state)",
        ylabel="time per generated token (ms)",
        title="Generation: time per token, batch size 1",
        logx=True,
        second={name: (positions, [state_bytes[name][p] / 1024 for p in positions]) for name in configs},
        second_ylabel="decoding state (KiB)",
    )

    first, last = positions[0], positions[-1]
    growth = seconds["spikewalze"][last].median / seconds["spikewalze"][first].median
    passed = growth <= 1.15
    targets = [
        Target(
            f"b. spikewalze time per token at position {last} vs {first}",
            "at most 1.15x",
            f"{growth:.2f}x",
            passed,
            None if passed else profile_last("spikewalze"),
        )
    ]
    constant = len(set(state_bytes["spikewalze"].values())) == 1
    targets.append(
        Target(
            "b. spikewalze state bytes constant over position",
            "constant",
            "constant" if constant else f"{min(state_bytes['spikewalze'].values())}..{max(state_bytes['spikewalze'].values())} bytes",
            constant,
        )
    )
    return Section(
        key="generation",
        title="b. Generation: time and state memory per token",
        description=(
            f"Batch size 1, `model.step` one token at a time with the hard gate. One sequence is stepped to each "
            f"position and its decoding state copied there; then {timed_steps} further steps from each copy are timed "
            "one by one, all models and positions taking turns (median, interquartile range). "
            f"Spike-Walze's gate is forced to spike rate {spike_rate} (the configured target) so the random weights "
            "spike as a trained model would; state bytes are the bytes of all tensors in the decoding state "
            "(ring buffers for Spike-Walze, the KV cache for `gpt`)."
        ),
        table=table,
        plots=[plot],
        targets=targets,
        data={"seconds": {n: {p: seconds[n][p].median for p in positions} for n in configs}, "state_bytes": state_bytes},
    )


# ----------------------------------------------------------------------------------------------
# c. The hard gate: gated work against the forced spike rate


def bench_hard_gate(
    base: ModelConfig, vocab_size: int, batch_size: int, seq_len: int, rates: list[float], repeats: int, img_dir: Path
) -> Section:
    """Time the hard-gate forward at forced spike rates; gated work = time(rate) - time(rate 0)."""
    all_rates = [0.0, *rates]
    idx, _ = random_batch(vocab_size, batch_size, seq_len)
    tokens = batch_size * seq_len
    whole: dict[str, dict[float, Timing]] = {}
    gated: dict[str, dict[float, Timing]] = {}
    forwards: dict[str, Callable[[float], Callable[[], None]]] = {}

    for expert in ("attention", "block"):
        cfg = variant_config(base, "learned", context=seq_len, spike={**base.spike.model_dump(), "mode": "learned", "expert": expert})
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size).eval()

        def forward_at(rate: float, model=model) -> Callable[[], None]:
            def run() -> None:
                model.set_gate_override(rate)
                with torch.no_grad():
                    model(idx, gate_mode="hard")

            return run

        forwards[expert] = forward_at
        for rate in all_rates:  # warm-up
            forward_at(rate)()
        samples: dict[float, list[float]] = {rate: [] for rate in all_rates}
        for _ in range(repeats):  # interleave the rates so drift in machine load hits all of them alike
            for rate in all_rates:
                samples[rate].append(measure(forward_at(rate), repeats=1, warmup=0).median)
        whole[expert] = {rate: timing_of(samples[rate]).scaled(1.0 / tokens) for rate in all_rates}
        gated[expert] = {
            rate: timing_of([s - z for s, z in zip(samples[rate], samples[0.0])]).scaled(1.0 / tokens) for rate in rates
        }
        model.set_gate_override(None)

    rows = []
    for expert in ("attention", "block"):
        full = gated[expert][1.0].median
        for rate in all_rates:
            share = "" if rate == 0.0 else f"{gated[expert][rate].median / full:.2f}"
            gated_us = "0 (reference)" if rate == 0.0 else gated[expert][rate].format_us()
            rows.append([expert, rate, gated_us, share, f"{rate + 0.1:.2f}" if rate else "", whole[expert][rate].format_us()])
    header = ["expert", "spike rate s", "gated work µs/token (IQR)", "gated(s) / gated(1)", "target at most", "whole model µs/token (IQR)"]
    table = markdown_table(header, rows)

    plot = "bench-hard-gate.png"
    series = {f"gated work, expert={e}": (rates, [gated[e][r].median / gated[e][1.0].median for r in rates]) for e in gated}
    series["target s + 0.1"] = (rates, [min(1.1, r + 0.1) for r in rates])
    series["proportional s"] = (rates, list(rates))
    plot_lines(img_dir / plot, series, xlabel="forced spike rate s", ylabel="gated work relative to s = 1", title="Hard gate: work follows the spike rate")

    targets = []
    for expert in ("attention", "block"):
        full = gated[expert][1.0].median
        worst = max((gated[expert][r].median / full - r, r) for r in rates if r < 1.0)
        passed = worst[0] <= 0.1
        rate = worst[1]
        targets.append(
            Target(
                f"c. gated work with expert={expert}",
                "at most (s + 0.1) x gated work at s = 1",
                f"worst at s={rate}: {gated[expert][rate].median / full:.2f}x (limit {rate + 0.1:.2f})",
                passed,
                None if passed else profile_table(forwards[expert](rate)),
            )
        )
    return Section(
        key="hard_gate",
        title="c. Hard gate: gated work against the forced spike rate",
        description=(
            f"Inference forward with the hard gate on {batch_size} x {seq_len} random tokens, gate forced to each "
            f"spike rate with `set_gate_override`, rates interleaved over {repeats} repeats. The gated work (query "
            "projection, scores, output projection, and with `expert: block` the feed-forward) is the time at rate s "
            "minus the time at rate 0 in the same repeat; the rate-0 time keeps the Walze, the detector, keys and "
            "values, the ungated feed-forward and the output layer. Whole model: total time per token."
        ),
        table=table,
        plots=[plot],
        targets=targets,
        data={
            "gated": {e: {r: gated[e][r].median for r in rates} for e in gated},
            "whole": {e: {r: whole[e][r].median for r in all_rates} for e in whole},
        },
    )


# ----------------------------------------------------------------------------------------------
# f. MFU against the measured matrix-product peak


def measure_matmul_peak(sizes: list[int], repeats: int) -> tuple[float, int]:
    """Return the best fp32 matrix-product FLOP/s over square sizes, and the size that reached it."""
    best, best_size = 0.0, sizes[0]
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        timing = measure(lambda a=a, b=b: torch.mm(a, b), repeats=repeats, warmup=2)
        flops = 2 * n**3 / timing.median
        if flops > best:
            best, best_size = flops, n
    return best, best_size


def bench_mfu(
    base: ModelConfig, config_name: str, vocab_size: int, batch_size: int, seq_len: int, matmul_sizes: list[int], repeats: int
) -> Section:
    """Compare the FLOP/s of a training step (3x forward FLOPs) with the measured matmul peak."""
    peak, peak_size = measure_matmul_peak(matmul_sizes, repeats=max(3, repeats))
    rows, targets, data = [], [], {"peak_flops": peak}
    tokens = batch_size * seq_len
    for variant in ("learned", "gpt"):
        cfg = variant_config(base, variant, context=seq_len)
        step = make_train_step(cfg, vocab_size, batch_size, seq_len)
        timing = measure(step, repeats=repeats, warmup=1)
        # The soft gate runs both paths for every token in training, so the dense count is the work done.
        forward = forward_flops_per_token(cfg, vocab_size, seq_len).dense
        step_flops = 3 * forward * tokens
        mfu = step_flops / timing.median / peak
        data[variant] = {"step_s": timing.median, "step_flops": step_flops, "mfu": mfu}
        rows.append([variant, f"{forward / 1e6:.2f}", f"{step_flops / 1e9:.1f}", timing.format_ms(), f"{step_flops / timing.median / 1e9:.1f}", f"{100 * mfu:.1f}%"])
        if variant == "learned":
            passed = mfu >= 0.40
            targets.append(
                Target(
                    f"f. training MFU, {config_name} config",
                    "at least 40% of the measured matmul peak",
                    f"{100 * mfu:.1f}%",
                    passed,
                    None if passed else profile_table(step),
                )
            )
        del step
        release()
    header = ["model", "forward MFLOPs/token", "step GFLOPs", "step ms (IQR)", "achieved GFLOP/s", "MFU"]
    table = markdown_table(header, rows)
    return Section(
        key="mfu",
        title="f. Hardware use: training MFU",
        description=(
            f"The {config_name} config, one training step of {batch_size} x {seq_len} tokens (forward, backward, "
            f"AdamW), fp32. Step FLOPs = 3 x forward FLOPs per token (dense count: the soft gate computes both paths "
            f"for every token in training) x tokens. Peak: the best fp32 `torch.mm` rate over square sizes "
            f"{matmul_sizes}, measured in the same run: {peak / 1e9:.1f} GFLOP/s at n = {peak_size}."
        ),
        table=table,
        targets=targets,
        data=data,
    )


# ----------------------------------------------------------------------------------------------
# h. Our gpt baseline against Hugging Face GPT2LMHeadModel


def make_hf_gpt2_step(cfg: ModelConfig, vocab_size: int, batch_size: int, seq_len: int) -> Callable[[], None]:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=int(cfg.mlp_ratio * cfg.d_model),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx, _ = random_batch(vocab_size, batch_size, seq_len)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=idx, labels=idx).loss.backward()
        optimizer.step()

    return step


def bench_hf_baseline(base: ModelConfig, config_name: str, vocab_size: int, batch_size: int, seq_len: int, repeats: int) -> Section:
    """Time our `gpt` training step against transformers' GPT2LMHeadModel of the same shape."""
    cfg = variant_config(base, "gpt", context=seq_len)
    steps = {
        "ours (gpt)": make_train_step(cfg, vocab_size, batch_size, seq_len),
        "transformers GPT2LMHeadModel (sdpa)": make_hf_gpt2_step(cfg, vocab_size, batch_size, seq_len),
    }
    timings = measure_interleaved(steps, repeats=repeats, warmup=1)
    ours, theirs = timings["ours (gpt)"].median, timings["transformers GPT2LMHeadModel (sdpa)"].median
    ratio = ours / theirs
    passed = ratio <= 1.1
    rows = [[name, timing.format_ms(), f"{timing.median / theirs:.2f}"] for name, timing in timings.items()]
    table = markdown_table(["model", "step ms (IQR)", "relative to transformers"], rows)
    target = Target(
        "h. gpt baseline step time vs transformers GPT2",
        "at most 1.1x",
        f"{ratio:.2f}x",
        passed,
        None if passed else profile_table(steps["ours (gpt)"]),
    )
    import transformers

    return Section(
        key="hf_baseline",
        title="h. The baseline against Hugging Face transformers",
        description=(
            f"Training step (forward, backward, AdamW) of our `gpt` and of transformers {transformers.__version__} "
            f"`GPT2LMHeadModel` with `attn_implementation=\"sdpa\"`, both with the {config_name} config's width "
            f"({cfg.d_model}), depth ({cfg.n_layer}), heads ({cfg.n_head}), feed-forward ({int(cfg.mlp_ratio * cfg.d_model)}), "
            f"vocab ({vocab_size}) and context ({seq_len}), batch {batch_size}, no dropout, alternated over {repeats} "
            "repeats. GPT-2 differs in details (LayerNorm with biases, GELU, learned positions)."
        ),
        table=table,
        targets=[target],
        data={"ours_s": ours, "transformers_s": theirs, "ratio": ratio},
    )
