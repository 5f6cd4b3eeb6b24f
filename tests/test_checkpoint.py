"""Checkpoints: atomic layout, manifest checks, partial and corrupt directories, load_for_inference."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TRAIN_OVERRIDES
from spikewalze_cli.checkpoint import (
    find_checkpoints,
    latest_checkpoint,
    load_for_inference,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    verify_checkpoint,
)
from spikewalze_cli.config import load_config
from spikewalze_cli.errors import UserError
from spikewalze_cli.training import train


# One torch thread: results then do not depend on the core count or on other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(tiny_run_inputs, tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 3 and 6 and a best one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("checkpoint_run") / "run"
    config = load_config(
        None,
        [*TINY_TRAIN_OVERRIDES, f"train.data='{tiny_run_inputs.data}'", f"train.tokenizer='{tiny_run_inputs.tokenizer}'", f"train.out='{out}'"],
    )
    run_dir = train(config)
    torch.set_num_threads(threads)
    return run_dir


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def test_checkpoint_files_are_safetensors_and_json(trained_run: Path):
    directory = step_dir(trained_run, 6)

    assert sorted(path.name for path in directory.iterdir()) == ["manifest.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        raw = (directory / name).read_bytes()
        header_length = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + header_length])  # a safetensors header is plain JSON
        assert all(entry["dtype"] in {"F32", "I64", "U8"} for key, entry in header.items() if key != "__metadata__")
    state = json.loads((directory / "state.json").read_text())
    assert state["step"] == 6
    assert len(state["rng"]["torch"]) == torch.get_rng_state().numel()
    assert set(state) >= {"rng", "data", "curriculum", "config", "tokenizer_sha256", "optimizer"}
    manifest = verify_checkpoint(directory)
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "state.json"}


def test_optimizer_state_round_trip(trained_run: Path):
    model = load_for_inference(trained_run).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])).loss.backward()
    optimizer.step()

    tensors, meta = optimizer_to_tensors(optimizer)
    rebuilt = optimizer_from_tensors(tensors, json.loads(json.dumps(meta)))

    original = optimizer.state_dict()
    assert rebuilt["param_groups"] == original["param_groups"]
    for index, values in original["state"].items():
        for name, value in values.items():
            assert torch.equal(rebuilt["state"][index][name], value)


def test_load_for_inference_from_run_and_checkpoint(trained_run: Path):
    from_run = load_for_inference(trained_run)
    from_best = load_for_inference(trained_run / "checkpoints" / "best")

    assert from_run.step == 6
    assert from_run.checkpoint_dir == step_dir(trained_run, 6)
    assert from_run.run_dir == trained_run
    assert from_run.tokens.vocab_size == 512
    assert not from_run.model.training
    assert from_best.config.model == from_run.config.model
    saved = load_file(step_dir(trained_run, 6) / "model.safetensors")
    parameters = dict(from_run.model.state_dict())
    for key, tensor in saved.items():
        assert torch.equal(parameters[key], tensor), key


def test_latest_skips_partial_checkpoint(run_copy: Path, caplog):
    partial = step_dir(run_copy, 9)
    shutil.copytree(step_dir(run_copy, 6), partial)
    (partial / "manifest.json").unlink()
    (run_copy / "checkpoints" / ".tmp-step-00000012-1").mkdir()

    with caplog.at_level(logging.WARNING):
        chosen = latest_checkpoint(run_copy)

    assert chosen == step_dir(run_copy, 6)
    assert sum("partial checkpoint" in message for message in caplog.messages) == 2
    complete, partial_dirs = find_checkpoints(run_copy)
    assert [path.name for path in partial_dirs] == [".tmp-step-00000012-1", "step-00000009"]
    assert partial.is_dir()  # reported, never deleted


def test_corrupt_checkpoint_is_rejected_and_skipped(run_copy: Path):
    newest = step_dir(run_copy, 6)
    weights = newest / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))

    with pytest.raises(UserError, match="sha256 of model.safetensors does not match"):
        verify_checkpoint(newest)
    with pytest.raises(UserError, match="corrupt"):
        load_for_inference(newest)
    assert load_for_inference(run_copy).step == 3
    assert weights.is_file()


def test_truncated_checkpoint_is_rejected(run_copy: Path):
    optimizer = step_dir(run_copy, 6) / "optimizer.safetensors"
    size = optimizer.stat().st_size
    with optimizer.open("r+b") as handle:
        handle.truncate(size // 2)

    with pytest.raises(UserError, match=f"optimizer.safetensors has {size // 2} bytes, the manifest expects {size}"):
        verify_checkpoint(step_dir(run_copy, 6))
    assert latest_checkpoint(run_copy) == step_dir(run_copy, 3)


def test_save_replaces_checkpoint_of_same_name(run_copy: Path, trained_run: Path):
    loaded = load_for_inference(trained_run)
    optimizer = torch.optim.AdamW(loaded.model.parameters())
    state = {"step": 42}

    first = save_checkpoint(run_copy, "best", loaded.model, optimizer, state)
    second = save_checkpoint(run_copy, "best", loaded.model, optimizer, {"step": 43})

    assert first == second
    assert json.loads((second / "state.json").read_text())["step"] == 43
    assert verify_checkpoint(second)["step"] == 43
    leftovers = [path.name for path in (run_copy / "checkpoints").iterdir() if path.name.startswith(".")]
    assert leftovers == []


def test_load_for_inference_bad_targets(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        load_for_inference(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run directory"):
        load_for_inference(tmp_path / "empty")


def test_keep_checkpoints_prunes_old_ones(tiny_train_config):
    run_dir = train(tiny_train_config("train.keep_checkpoints=1", "train.checkpoint_interval=2"))

    names = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert names == ["best", "step-00000006"]
