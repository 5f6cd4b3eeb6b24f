"""Determinism: the same seed and config give the same bytes and the same loss curve on the CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TRAIN_OVERRIDES
from spikewalze_cli.config import load_config
from spikewalze_cli.data import prepare_data
from spikewalze_cli.tokenizer import build_tokenizer
from spikewalze_cli.training import train
from spikewalze_cli.training.metrics import read_records
from test_reliability_faults import tree_digest


# One torch thread: results then do not depend on the core count or on other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_prepare_and_tokenizer_byte_identical(shared_data: Path, tmp_path: Path):
    config = load_config(
        None,
        [
            f"data.inputs=['{shared_data / 'dewiki-articles.parquet'}']",
            "data.max_articles=12",
            "data.num_proc=1",
            f"data.out='{tmp_path / 'data'}'",
            f"tokenizer.out='{tmp_path / 'tokenizer'}'",
            "tokenizer.vocab_size=300",
        ],
    )

    # Both runs write to the same paths, because config.yaml and the tokenizer manifest record them.
    digests = []
    for _ in range(2):
        prepare_data(config)
        build_tokenizer(config)
        digests.append((tree_digest(tmp_path / "data"), tree_digest(tmp_path / "tokenizer")))
        shutil.rmtree(tmp_path / "data")
        shutil.rmtree(tmp_path / "tokenizer")

    first, second = digests
    assert "units/state.json" in first[0]
    assert first[0] == second[0]
    # The tokenizer manifest records the sha256 of the data manifest, which contains the time
    # prepare-data ran. Everything else in the tokenizer directory must match byte for byte.
    for tokenizer_digest in (first[1], second[1]):
        manifest = json.loads(tokenizer_digest["manifest.json"])
        assert len(manifest.pop("data_manifest_sha256")) == 64
        tokenizer_digest["manifest.json"] = manifest
    assert first[1] == second[1]


def loss_curve(inputs, run_dir: Path, *overrides: str) -> list[float]:
    paths = [f"train.data='{inputs.data}'", f"train.tokenizer='{inputs.tokenizer}'", f"train.out='{run_dir}'"]
    train(load_config(None, [*TINY_TRAIN_OVERRIDES, *paths, "train.max_steps=4", "train.checkpoint_interval=4", *overrides]))
    return [record["loss"] for record in read_records(run_dir / "metrics.jsonl") if record["kind"] == "train"]


def test_same_seed_same_loss_curve(tiny_run_inputs, tmp_path: Path):
    first = loss_curve(tiny_run_inputs, tmp_path / "first")
    second = loss_curve(tiny_run_inputs, tmp_path / "second")
    other_seed = loss_curve(tiny_run_inputs, tmp_path / "other", "train.seed=7")

    assert len(first) == 4
    assert first == second  # exact float equality, not approximate
    assert other_seed != first
    weights = [load_file(tmp_path / name / "checkpoints" / "step-00000004" / "model.safetensors") for name in ("first", "second")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
