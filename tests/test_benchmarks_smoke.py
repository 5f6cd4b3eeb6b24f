"""Smoke tests of `make bench`: every benchmark runs at toy size and writes its table and plots.

They check that the page is complete, never the figures on it: speed targets are not timed tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of the checkout, not an installed package

from benchmarks.model_bench import Settings, run_benchmarks  # noqa: E402

SPEED_TITLES = {
    "train_step": "a. Training step cost per token against sequence length",
    "generation": "b. Generation: time and state memory per token",
    "hard_gate": "c. Hard gate: gated work against the forced spike rate",
    "mfu": "f. Hardware use: training MFU",
    "hf_baseline": "h. The baseline against Hugging Face transformers",
}
QUALITY_TITLES = {
    "quality": "d. Quality at equal wall-clock budget",
    "curriculum": "e. Curriculum schedules at equal steps",
    "spike_stage": "g. Spike rate per curriculum stage",
}


def toy_settings() -> Settings:
    tiny = REPO / "configs" / "tiny.yaml"
    return Settings(
        mode="toy",
        speed_config=tiny,
        mfu_config=tiny,
        model_overrides={"n_layer": 2, "n_head": 2, "d_model": 32, "context": 64, "window": 16, "walze_width": 8},
        vocab_size=300,
        train_seq_lens=[32, 64],
        train_batch_tokens=128,
        train_repeats=2,
        gen_positions=[8, 24],
        gen_timed_steps=2,
        gate_batch=1,
        gate_seq_len=64,
        gate_repeats=2,
        mfu_batch=2,
        matmul_sizes=[64, 128],
        mfu_repeats=2,
        quality_max_articles=40,
        quality_vocab_size=320,
        quality_budget_s=15.0,
        quality_overrides=["train.batch_tokens=256", "train.micro_batch_size=4", "train.eval_batches=1", "train.warmup_steps=2"],
        eval_overrides=["eval.max_batches=1"],
        curriculum_steps=4,
        curriculum_evals=2,
    )


@pytest.fixture
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_page(page: str, out: Path, sections, titles: dict[str, str]) -> None:
    assert [section.key for section in sections] == list(titles)
    for section in sections:
        assert f"## {titles[section.key]}" in page
        assert section.table in page
        assert section.table.count("\n") >= 2, f"{section.key} table has no rows"
        for plot in section.plots:
            assert (out / "img" / plot).stat().st_size > 1000, f"{plot} is missing or empty"
    assert "CPU-only" in page
    assert "## Missed targets" in page


def test_speed_benchmarks_write_page(tmp_path, few_threads):
    out = tmp_path / "docs"
    sections = run_benchmarks(toy_settings(), "abcfh", out, tmp_path / "work", "toy")
    page = (out / "benchmarks.md").read_text(encoding="utf-8")

    check_page(page, out, sections, SPEED_TITLES)
    targets = [target.name for section in sections for target in section.targets]
    assert "a. learned cost per token at T=64 vs T=32" in targets
    assert "b. spikewalze state bytes constant over position" in targets
    assert "c. gated work with expert=block" in targets
    assert "h. gpt baseline step time vs transformers GPT2" in targets
    assert (tmp_path / "work" / "results.json").is_file()


@pytest.mark.slow
def test_quality_benchmarks_write_page(tmp_path, shared_data, few_threads):
    out = tmp_path / "docs"
    sections = run_benchmarks(toy_settings(), "deg", out, tmp_path / "work", "toy")
    page = (out / "benchmarks.md").read_text(encoding="utf-8")

    check_page(page, out, sections, QUALITY_TITLES)
    quality = sections[0].data
    assert set(quality) == {"learned", "always", "never", "gpt"}
    for variant, figures in quality.items():
        assert figures["steps"] >= 1, f"{variant} trained no step"
        assert 0 < figures["bpb_hard"] < 20
    assert sections[2].data["per_stage"], "no per-stage figures for the learned model"
