"""Fault injection: SIGKILL during training and prepare-data, a full disk, and a checkpoint that is a pickle.

Each case uses the real commands on the tiny inputs. A kill is a real SIGKILL of a real process.
A full disk is a small tmpfs where mounting one is allowed (root on Linux). Everywhere, an
os.fsync that fails with ENOSPC simulates it as well, as fsync(2) fails on filesystems that
allocate space only when data is flushed (NFS, for example).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import TINY_TRAIN_OVERRIDES
from spikewalze_cli.checkpoint import WRITE_DELAY_ENV, find_checkpoints, load_for_inference, verify_checkpoint
from spikewalze_cli.cli import app
from spikewalze_cli.config import load_config
from spikewalze_cli.errors import UserError
from spikewalze_cli.io import sha256_file
from spikewalze_cli.tokenizer import TokenStore, open_units
from spikewalze_cli.training import resume, train

REPO = Path(__file__).resolve().parents[1]

# Sixteen steps with a checkpoint every second step and a validation every fourth.
KILL_STEPS = 24
KILL_RUN_OVERRIDES = [
    f"train.max_steps={KILL_STEPS}",
    "train.checkpoint_interval=2",
    "train.eval_interval=4",
    "train.keep_checkpoints=2",
]


# One torch thread: results then do not depend on the core count or on other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "400", **extra}


def run_config(inputs, run_dir: Path, *overrides: str):
    paths = [f"train.data='{inputs.data}'", f"train.tokenizer='{inputs.tokenizer}'", f"train.out='{run_dir}'"]
    return load_config(None, [*TINY_TRAIN_OVERRIDES, *paths, *overrides])


def train_command(inputs, run_dir: Path) -> list[str]:
    args = [sys.executable, "-m", "spikewalze_cli", "train"]
    args += ["--data", str(inputs.data), "--tokenizer", str(inputs.tokenizer), "--out", str(run_dir)]
    for override in [*TINY_TRAIN_OVERRIDES, *KILL_RUN_OVERRIDES]:
        args += ["--set", override]
    return args


def last_train_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return max(steps)


def half_written_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return [path for path in root.glob(".tmp-step-*") if (path / "model.safetensors").is_file()] if root.is_dir() else []


def assert_checkpoints_readable(run_dir: Path) -> None:
    """Every checkpoint that claims to be complete verifies and its tensors load."""
    complete, _ = find_checkpoints(run_dir)
    best = run_dir / "checkpoints" / "best"
    for directory in [*complete, *([best] if best.is_dir() else [])]:
        verify_checkpoint(directory)
        load_file(directory / "model.safetensors")
        load_file(directory / "optimizer.safetensors")
        json.loads((directory / "state.json").read_text())


def assert_same_tensors(expected_dir: Path, actual_dir: Path) -> None:
    for file in ("model.safetensors", "optimizer.safetensors"):
        expected, actual = load_file(expected_dir / file), load_file(actual_dir / file)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{file}: {key} differs"


# ----------------------------------------------------------------------------------------------
# SIGKILL during training


@pytest.mark.slow
def test_sigkill_training_five_times_then_resume(tiny_run_inputs, tmp_path: Path, caplog):
    straight = train(run_config(tiny_run_inputs, tmp_path / "straight", *KILL_RUN_OVERRIDES))

    run_dir = tmp_path / "killed"
    rng = random.Random(20170701)
    # Two of the five kills land inside a checkpoint write, the others after a random step.
    moments = ["step", "checkpoint", "step", "checkpoint", "step"]
    partial_seen: list[str] = []
    for index, moment in enumerate(moments):
        command = train_command(tiny_run_inputs, run_dir) if index == 0 else [sys.executable, "-m", "spikewalze_cli", "resume", str(run_dir)]
        start_step = last_train_step(run_dir)
        # After the first checkpoint (step 2), and short of the last step so the run is still alive.
        target = min(max(start_step + rng.randint(1, 3), 3), KILL_STEPS - 2)
        # A short delay in every checkpoint write keeps a fast machine from finishing the run
        # between the poll that sees the target step and the kill.
        env = subprocess_env(**{WRITE_DELAY_ENV: "3" if moment == "checkpoint" else "0.5"})
        log_path = tmp_path / f"process-{index}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + 240
            while process.poll() is None and time.monotonic() < deadline:
                if moment == "step" and last_train_step(run_dir) >= target:
                    time.sleep(rng.uniform(0.0, 0.1))
                    break
                if moment == "checkpoint" and any(p.name.endswith(f"-{process.pid}") for p in half_written_checkpoints(run_dir)):
                    break
                time.sleep(0.02)
            assert process.poll() is None, f"process {index} ended before its kill:\n{log_path.read_text()}"
            process.send_signal(signal.SIGKILL)
            process.wait()

        output = log_path.read_text()
        assert "Traceback" not in output, output
        for name in partial_seen:
            assert "skipping partial checkpoint" in output, output
            assert name in output, output
        assert_checkpoints_readable(run_dir)
        partial_seen = [path.name for path in find_checkpoints(run_dir)[1]]
        if moment == "checkpoint":
            assert any(name.startswith(".tmp-step-") for name in partial_seen)

    newest = find_checkpoints(run_dir)[0][-1]
    with caplog.at_level("INFO"):
        resume(run_dir)

    assert any(f"from checkpoints/{newest.name}" in record.getMessage() for record in caplog.records)
    for name in partial_seen:
        assert any(name in record.getMessage() and "partial" in record.getMessage() for record in caplog.records)
    final = run_dir / "checkpoints" / f"step-{KILL_STEPS:08d}"
    assert_same_tensors(straight / "checkpoints" / f"step-{KILL_STEPS:08d}", final)
    assert_checkpoints_readable(run_dir)


def test_resume_after_half_written_metrics_line(tiny_run_inputs, tmp_path: Path):
    run_dir = train(run_config(tiny_run_inputs, tmp_path / "run", "train.max_steps=3"))
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "train", "step": 4, "lo')  # a kill in the middle of a line

    resume(run_dir, overrides=["train.max_steps=4"])

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if record["kind"] == "train"] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# SIGKILL during prepare-data


def tree_digest(directory: Path) -> dict[str, str]:
    """Hash every file; the manifest without its two timing fields, which differ per run."""
    digests = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        if path.name == "manifest.json":
            manifest = json.loads(path.read_text())
            for key in ("created", "seconds"):
                manifest.pop(key, None)
            digests[str(path.relative_to(directory))] = json.dumps(manifest, sort_keys=True)
        else:
            digests[str(path.relative_to(directory))] = sha256_file(path)
    return digests


def prepare_command(shared_data: Path, out: Path) -> list[str]:
    parquet = shared_data / "dewiki-articles.parquet"
    return [sys.executable, "-m", "spikewalze_cli", "prepare-data", "--input", str(parquet), "--out", str(out),
            "--max-articles", "40", "--set", "data.num_proc=1"]


@pytest.mark.slow
@pytest.mark.parametrize("marker", [".data.partial/scratch", ".data.partial/units"], ids=["segmenting", "saving"])
def test_sigkill_prepare_data_then_rerun(shared_data: Path, tmp_path: Path, marker: str):
    # The uninterrupted run writes to the same path, because config.yaml records the output path.
    out = tmp_path / "data"
    assert subprocess.run(prepare_command(shared_data, out), env=subprocess_env(), capture_output=True).returncode == 0
    reference = tree_digest(out)
    shutil.rmtree(out)

    process = subprocess.Popen(prepare_command(shared_data, out), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not (tmp_path / marker).exists():
        time.sleep(0.002)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()

    assert process.returncode == -signal.SIGKILL, "prepare-data finished before the kill"
    with pytest.raises(UserError):
        open_units(out)

    rerun = subprocess.run(prepare_command(shared_data, out), env=subprocess_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert tree_digest(out) == reference
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]


# ----------------------------------------------------------------------------------------------
# Full disk


class SmallDisk:
    """A tmpfs of a few megabytes mounted for one test, with a filler file to use up its space."""

    def __init__(self, mount_point: Path, megabytes: int):
        self.path = mount_point
        self.path.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command to create a tmpfs; the fsync variant covers ENOSPC")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(self.path)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or 'not root'}); the fsync variant covers ENOSPC")

    def fill(self, leave_bytes: int) -> None:
        free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
        with (self.path / "filler").open("wb") as handle:
            handle.write(b"\0" * max(free - leave_bytes, 0))

    def free_space(self) -> None:
        (self.path / "filler").unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path):
    disks: list[SmallDisk] = []

    def mount(megabytes: int) -> SmallDisk:
        disk = SmallDisk(tmp_path / f"disk{len(disks)}", megabytes)
        disks.append(disk)
        return disk

    yield mount
    for disk in disks:
        disk.unmount()


def assert_one_error_line(result, *fragments: str) -> None:
    """Exit 2 with exactly one error line (progress lines before it are fine) and no traceback."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), errors[0]


def test_full_tmpfs_during_checkpoint(tiny_run_inputs, tmp_path: Path, small_disk):
    # The same two commands without a full disk: train 3 steps, resume to 6.
    straight = train(run_config(tiny_run_inputs, tmp_path / "straight", "train.max_steps=3"))
    resume(straight, overrides=["train.max_steps=6"])
    disk = small_disk(8)
    run_dir = disk.path / "run"
    train(run_config(tiny_run_inputs, run_dir, "train.max_steps=3"))
    step_3 = run_dir / "checkpoints" / "step-00000003"
    before = {file: sha256_file(step_3 / file) for file in ("model.safetensors", "optimizer.safetensors", "state.json")}

    disk.fill(leave_bytes=64 * 1024)  # room for metrics, not for a 580 KB checkpoint
    result = CliRunner().invoke(app, ["resume", str(run_dir), "--set", "train.max_steps=6"])

    assert_one_error_line(result, "No space left on device")
    verify_checkpoint(step_3)
    assert {file: sha256_file(step_3 / file) for file in before} == before
    assert [path.name for path in find_checkpoints(run_dir)[1]] == []  # the half-written one is gone

    disk.free_space()
    resume(run_dir, overrides=["train.max_steps=6"])
    assert_same_tensors(straight / "checkpoints" / "step-00000006", run_dir / "checkpoints" / "step-00000006")


def test_full_tmpfs_during_prepare_data(shared_data: Path, small_disk):
    disk = small_disk(3)
    out = disk.path / "data"
    parquet = shared_data / "dewiki-articles.parquet"

    result = CliRunner().invoke(app, ["prepare-data", "--input", str(parquet), "--out", str(out), "--max-articles", "60", "--set", "data.num_proc=1"])

    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(errors) == 1, result.output
    assert "no space left on device" in errors[0].lower(), result.output
    with pytest.raises(UserError):
        open_units(out)
    assert list(disk.path.iterdir()) == []  # the partial output is removed, so its space is free again


def failing_fsync(after_calls: int):
    """Return an os.fsync stand-in that fails with ENOSPC from call `after_calls` + 1 on."""
    real_fsync = os.fsync
    calls = {"count": 0}

    def fsync(fd: int) -> None:
        calls["count"] += 1
        if calls["count"] > after_calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    return fsync


# resume makes two fsync calls (config.yaml and its directory) before the first checkpoint. The
# checkpoint then syncs weights, optimizer and state, then the manifest file, then the directories.
@pytest.mark.parametrize("after_calls", [2, 4, 5, 7], ids=["weights", "state", "manifest", "directory"])
def test_enospc_fsync_during_checkpoint(tiny_run_inputs, tmp_path: Path, monkeypatch, after_calls: int):
    run_dir = train(run_config(tiny_run_inputs, tmp_path / "run", "train.max_steps=3", "train.eval_interval=100"))
    step_3 = run_dir / "checkpoints" / "step-00000003"
    before = sha256_file(step_3 / "model.safetensors")

    monkeypatch.setattr(os, "fsync", failing_fsync(after_calls))
    result = CliRunner().invoke(app, ["resume", str(run_dir), "--set", "train.max_steps=6"])
    monkeypatch.undo()

    assert_one_error_line(result, "No space left on device")
    verify_checkpoint(step_3)
    assert sha256_file(step_3 / "model.safetensors") == before
    assert find_checkpoints(run_dir) == ([step_3], [])

    resume(run_dir, overrides=["train.max_steps=6"])
    verify_checkpoint(run_dir / "checkpoints" / "step-00000006")


def test_enospc_fsync_during_prepare_data(shared_data: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "data"
    parquet = shared_data / "dewiki-articles.parquet"

    monkeypatch.setattr(os, "fsync", failing_fsync(0))
    result = CliRunner().invoke(app, ["prepare-data", "--input", str(parquet), "--out", str(out), "--max-articles", "5", "--set", "data.num_proc=1"])
    monkeypatch.undo()

    assert_one_error_line(result, "No space left on device")
    with pytest.raises(UserError):
        open_units(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# A checkpoint that is a pickle


class CreatesFile:
    """Unpickling this object creates `path`: the test fails if any loader runs it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def rewrite_manifest(checkpoint: Path) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"bytes": (checkpoint / name).stat().st_size, "sha256": sha256_file(checkpoint / name)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def write_pickle(path: Path, marker: Path, style: str) -> None:
    if style == "pickle":
        path.write_bytes(pickle.dumps({"weight": CreatesFile(marker)}))
    else:  # torch.save: a zip archive with a pickle inside, the format of .pt and .bin checkpoints
        torch.save({"weight": CreatesFile(marker)}, path)


@pytest.mark.parametrize("style", ["pickle", "torch.save"])
@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_pickled_checkpoint_file_never_runs(tiny_trained_run: Path, tmp_path: Path, file: str, style: str):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_trained_run, run_dir)
    checkpoint = find_checkpoints(run_dir)[0][-1]
    marker = tmp_path / "pwned"
    write_pickle(checkpoint / file, marker, style)
    rewrite_manifest(checkpoint)  # the manifest vouches for the file, so the loader itself must refuse it

    evaluate = CliRunner().invoke(app, ["evaluate", str(checkpoint), "--set", "eval.max_batches=1"])
    generate = CliRunner().invoke(app, ["generate", str(checkpoint), "--prompt", "Aachen", "--max-new-tokens", "2"])
    resumed = CliRunner().invoke(app, ["resume", str(run_dir), "--set", "train.max_steps=40"])

    assert not marker.exists()
    # Inference never reads the optimizer state, so it runs; every other file is rejected.
    inference_exit = 0 if file == "optimizer.safetensors" else 2
    for result, expected in [(evaluate, inference_exit), (generate, inference_exit), (resumed, 2)]:
        assert result.exit_code == expected, result.output
        assert "Traceback" not in result.output
        assert "internal error" not in result.output
    if file != "optimizer.safetensors":
        with pytest.raises(UserError):
            load_for_inference(checkpoint)
    assert not marker.exists()


def test_pickled_token_index_never_runs(tiny_run_inputs, tmp_path: Path):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_run_inputs.tokenizer, tokenizer)
    marker = tmp_path / "pwned"
    np.save(tokenizer / "tokens" / "train-A.units.npy", np.array([CreatesFile(marker)], dtype=object), allow_pickle=True)

    with pytest.raises(UserError, match="train-A.units.npy"):
        TokenStore(tokenizer).units("train", "A")

    assert not marker.exists()


@pytest.mark.slow
def test_sigkill_before_first_checkpoint(tiny_run_inputs, tmp_path: Path):
    run_dir = tmp_path / "run"
    env = subprocess_env(**{WRITE_DELAY_ENV: "3"})
    process = subprocess.Popen(train_command(tiny_run_inputs, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while process.poll() is None and not half_written_checkpoints(run_dir):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before the kill"

    result = CliRunner().invoke(app, ["resume", str(run_dir)])

    assert_one_error_line(result, "no complete checkpoint", f"delete {run_dir}", "spikewalze train")
    shutil.rmtree(run_dir)  # the fix the error message gives
    train(run_config(tiny_run_inputs, run_dir, "train.max_steps=2", "train.checkpoint_interval=2"))
    verify_checkpoint(run_dir / "checkpoints" / "step-00000002")
