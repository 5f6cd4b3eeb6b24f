"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real German data folder beside the checkout; tests that need it skip without it."""
    if not (SHARED_DATA / "dewiki-articles.parquet").is_file():
        pytest.skip(f"real German data not found at {SHARED_DATA} (only developer and CI machines have it)")
    return SHARED_DATA


class TinyRunInputs(NamedTuple):
    data: Path  # prepared data directory
    tokenizer: Path  # tokenizer directory built from it


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> TinyRunInputs:
    """Prepared data from 60 real German articles and a 512-token tokenizer, built once per session."""
    from spikewalze_cli.config import load_config
    from spikewalze_cli.data import prepare_data
    from spikewalze_cli.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("tiny_run_inputs")
    config = load_config(
        None,
        [
            f"data.inputs=['{shared_data / 'dewiki-articles.parquet'}']",
            "data.max_articles=60",
            "data.num_proc=1",
            f"data.out='{root / 'data'}'",
            f"tokenizer.data='{root / 'data'}'",
            f"tokenizer.out='{root / 'tokenizer'}'",
            "tokenizer.vocab_size=512",
        ],
    )
    prepare_data(config)
    build_tokenizer(config)
    return TinyRunInputs(root / "data", root / "tokenizer")


# A model of about 30k parameters that trains a step in well under a second on one CPU thread.
TINY_TRAIN_OVERRIDES = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.context=32",
    "model.window=16",
    "model.walze_width=8",
    "model.spike.detector_hidden=8",
    "train.batch_tokens=256",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    "train.max_steps=6",
    "train.eval_interval=3",
    "train.eval_batches=4",
    "train.checkpoint_interval=3",
    "train.log_interval=1",
    "train.peak_flops=1.0e11",
    "train.device=cpu",
]


@pytest.fixture
def tiny_train_config(tiny_run_inputs: TinyRunInputs, tmp_path: Path):
    """Return a factory of training configs for the tiny inputs, writing runs under tmp_path."""
    from spikewalze_cli.config import Config, load_config

    def make(*overrides: str, out: Path | None = None) -> Config:
        paths = [
            f"train.data='{tiny_run_inputs.data}'",
            f"train.tokenizer='{tiny_run_inputs.tokenizer}'",
            f"train.out='{out or tmp_path / 'run'}'",
        ]
        return load_config(None, [*TINY_TRAIN_OVERRIDES, *paths, *overrides])

    return make


# Trained runs for evaluate and generate: 30 steps of a 64-wide model, a few seconds each.
TRAINED_RUN_OVERRIDES = [
    "model.d_model=64",
    "model.context=64",
    "train.batch_tokens=512",
    "train.micro_batch_size=8",
    "train.warmup_steps=3",
    "train.max_steps=30",
    "train.eval_interval=30",
    "train.eval_batches=2",
    "train.checkpoint_interval=30",
    "train.log_interval=10",
]


def _train_tiny_run(inputs: TinyRunInputs, out: Path, *overrides: str) -> Path:
    from spikewalze_cli.config import load_config
    from spikewalze_cli.training import train

    paths = [f"train.data='{inputs.data}'", f"train.tokenizer='{inputs.tokenizer}'", f"train.out='{out}'"]
    return train(load_config(None, [*TINY_TRAIN_OVERRIDES, *TRAINED_RUN_OVERRIDES, *paths, *overrides]))


@pytest.fixture(scope="session")
def tiny_trained_run(tiny_run_inputs: TinyRunInputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Spike-Walze run directory trained for 30 steps on the tiny inputs, built once per session."""
    return _train_tiny_run(tiny_run_inputs, tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture(scope="session")
def tiny_trained_gpt_run(tiny_run_inputs: TinyRunInputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gpt baseline trained the same way."""
    return _train_tiny_run(tiny_run_inputs, tmp_path_factory.mktemp("trained-gpt") / "run", "model.arch=gpt")


@pytest.fixture
def one_thread():
    """Run the test on one torch thread, so results do not depend on the core count or other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
