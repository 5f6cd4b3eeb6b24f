"""train and resume with a tiny model on real German data: exact resume, signals, non-finite loss, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TRAIN_OVERRIDES
from spikewalze_cli.checkpoint import find_checkpoints, read_state, verify_checkpoint
from spikewalze_cli.errors import UserError
from spikewalze_cli.training import resume, train
from spikewalze_cli.training.metrics import read_records

REPO = Path(__file__).resolve().parents[1]


# One torch thread: results then do not depend on the core count or on other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


def train_records(run_dir: Path) -> list[dict]:
    return [record for record in read_records(run_dir / "metrics.jsonl") if record["kind"] == "train"]


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def cli_args(inputs, run_dir: Path, *overrides: str) -> list[str]:
    args = ["--data", str(inputs.data), "--tokenizer", str(inputs.tokenizer), "--out", str(run_dir)]
    for override in [*TINY_TRAIN_OVERRIDES, *overrides]:
        args += ["--set", override]
    return args


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "400"}


def test_train_writes_run_directory(tiny_train_config, tmp_path: Path):
    run_dir = train(tiny_train_config())

    assert sorted(path.name for path in run_dir.iterdir()) == ["checkpoints", "config.yaml", "curves.png", "metrics.jsonl", "run.json"]
    complete, partial = find_checkpoints(run_dir)
    assert [path.name for path in complete] == ["step-00000003", "step-00000006"]
    assert partial == []
    for directory in [*complete, run_dir / "checkpoints" / "best"]:
        verify_checkpoint(directory)

    records = train_records(run_dir)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(record["loss"]) for record in records)
    assert records[-1]["tokens"] == 6 * 256
    validation = [record for record in read_records(run_dir / "metrics.jsonl") if record["kind"] == "validation"]
    assert [record["step"] for record in validation] == [3, 6]
    assert set(validation[-1]["stages"]) == {"A", "B", "C", "D"}
    assert 0.0 < validation[-1]["bpb"] < 20.0

    state = read_state(checkpoint(run_dir, 6))
    assert state["step"] == 6
    assert state["config"]["model"]["d_model"] == 32
    assert json.loads((run_dir / "run.json").read_text())["tokenizer_sha256"] == state["tokenizer_sha256"]


def test_resume_matches_straight_run(tiny_train_config, tmp_path: Path):
    straight = train(tiny_train_config(out=tmp_path / "straight"))

    # A copy stopped after step 3: the step-6 checkpoint and later metrics never got written.
    crashed = tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    shutil.rmtree(checkpoint(crashed, 6))
    resume(crashed)

    for file in ("model.safetensors", "optimizer.safetensors"):
        expected = load_file(checkpoint(straight, 6) / file)
        actual = load_file(checkpoint(crashed, 6) / file)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{file}: {key} differs after resume"
    assert [r["loss"] for r in train_records(crashed)] == [r["loss"] for r in train_records(straight)]
    assert read_state(checkpoint(crashed, 6))["data"] == read_state(checkpoint(straight, 6))["data"]


def test_resume_extends_max_steps(tiny_train_config, tmp_path: Path):
    run_dir = train(tiny_train_config())

    resume(run_dir, overrides=["train.max_steps=8"])

    assert [record["step"] for record in train_records(run_dir)] == list(range(1, 9))
    assert read_state(checkpoint(run_dir, 8))["config"]["train"]["max_steps"] == 8


def test_bf16_autocast_trains(tiny_train_config):
    run_dir = train(tiny_train_config("train.precision=bf16", "train.max_steps=3"))

    records = train_records(run_dir)
    assert len(records) == 3
    assert all(math.isfinite(record["loss"]) for record in records)
    weights = load_file(checkpoint(run_dir, 3) / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}  # fp32 master weights


def test_resume_finished_run_redraws_plot(tiny_train_config):
    run_dir = train(tiny_train_config())
    (run_dir / "curves.png").unlink()
    before = sorted(path.name for path in (run_dir / "checkpoints").iterdir())

    resume(run_dir)

    assert (run_dir / "curves.png").is_file()
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == before
    assert [record["step"] for record in train_records(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_nonfinite_loss_stops_with_checkpoint(tiny_train_config):
    # A learning rate of 1e30 makes the weights overflow after the first update.
    config = tiny_train_config(
        "train.lr=1.0e30",
        "train.min_lr=0",
        "train.warmup_steps=0",
        "train.grad_clip=0",
        "train.max_nonfinite_steps=2",
        "train.max_steps=20",
    )

    with pytest.raises(UserError, match="non-finite in 2 steps in a row") as error:
        train(config)

    run_dir = Path(config.train.out)
    records = train_records(run_dir)
    assert [record["skipped"] for record in records] == [False, True, True]
    assert records[-1]["loss"] is None
    saved = checkpoint(run_dir, 3)
    assert str(saved) in str(error.value)
    verify_checkpoint(saved)
    assert read_state(saved)["nonfinite"] == {"in_a_row": 2, "total": 2}
    weights = load_file(saved / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tiny_run_inputs, tmp_path: Path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "spikewalze_cli", "train",
        *cli_args(tiny_run_inputs, run_dir, "train.max_steps=500", "train.checkpoint_interval=1000", "train.eval_interval=1000"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(train_records(run_dir)) >= 2:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr
    assert f"spikewalze resume {run_dir}" in stderr
    stopped_at = train_records(run_dir)[-1]["step"]
    assert 2 <= stopped_at < 500
    verify_checkpoint(checkpoint(run_dir, stopped_at))

    resume(run_dir, overrides=[f"train.max_steps={stopped_at + 2}"])
    assert [record["step"] for record in train_records(run_dir)] == list(range(1, stopped_at + 3))


@pytest.mark.slow
def test_two_processes_match_one(tiny_train_config, tiny_run_inputs, tmp_path: Path):
    single = train(tiny_train_config("train.max_steps=5", "train.checkpoint_interval=5", out=tmp_path / "single"))

    pair = tmp_path / "pair"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "spikewalze_cli"]
    result = subprocess.run(
        [*launcher, "train", *cli_args(tiny_run_inputs, pair, "train.max_steps=5", "train.checkpoint_interval=5")],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    single_losses = [record["loss"] for record in train_records(single)]
    pair_records = train_records(pair)
    assert [record["step"] for record in pair_records] == [1, 2, 3, 4, 5]  # rank 1 wrote nothing
    for step, (expected, actual) in enumerate(zip(single_losses, [r["loss"] for r in pair_records]), start=1):
        assert abs(expected - actual) < 1e-5, f"step {step}: one process {expected}, two processes {actual}"
    assert read_state(checkpoint(pair, 5))["world_size"] == 2

    result = subprocess.run(
        [*launcher, "resume", str(pair), "--set", "train.max_steps=7"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [record["step"] for record in train_records(pair)] == list(range(1, 8))
    verify_checkpoint(checkpoint(pair, 7))


def test_unigram_baseline_matches_direct_count(tiny_run_inputs):
    from collections import Counter

    from spikewalze_cli.tokenizer import TokenStore
    from spikewalze_cli.training.metrics import unigram_bits_per_byte

    tokens = TokenStore(tiny_run_inputs.tokenizer)
    counts = Counter()
    for stage in tokens.stages:
        counts.update(tokens.tokens("train", stage).tolist())
    total = sum(counts.values()) + tokens.vocab_size
    bits, num_bytes = 0.0, 0
    for stage in tokens.stages:
        for token in tokens.tokens("validation", stage).tolist():
            bits -= math.log2((counts[token] + 1) / total)
        num_bytes += int(tokens.units("validation", stage)["bytes"].sum())

    assert unigram_bits_per_byte(tokens) == pytest.approx(bits / num_bytes, rel=1e-9)
    assert 1.0 < bits / num_bytes < 8.0


def test_bits_per_byte_formula():
    from spikewalze_cli.training.metrics import bits_per_byte

    # 2 bits per token over 100 tokens that cover 50 bytes: 4 bits per byte.
    assert bits_per_byte(2 * math.log(2), 100, 50) == pytest.approx(4.0)
    assert math.isnan(bits_per_byte(1.0, 10, 0))
