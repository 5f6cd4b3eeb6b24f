"""`spikewalze build-tokenizer` through the command line: success, and bad input as one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spikewalze_cli.cli import app
from spikewalze_cli.tokenizer import TokenStore
from test_tokenizer import write_data_dir


@pytest.fixture(scope="module")
def data_dir(shared_data: Path, tmp_path_factory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("data"), shared_data / "dewiki-articles.parquet", articles=10)


def run_cli(*args: str):
    return CliRunner().invoke(app, ["build-tokenizer", *args])


def assert_one_line_error(result, *fragments: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_builds_tokenizer(data_dir: Path, tmp_path: Path):
    out = tmp_path / "tok"

    result = run_cli("--data", str(data_dir), "--out", str(out), "--set", "tokenizer.vocab_size=320")

    assert result.exit_code == 0, result.output
    assert "fertility" in result.output
    assert TokenStore(out).vocab_size == 320
    assert json.loads((out / "manifest.json").read_text())["data_dir"] == str(data_dir.resolve())


def test_cli_flags_override_config_file(data_dir: Path, tmp_path: Path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"tokenizer:\n  data: {tmp_path / 'elsewhere'}\n  out: {tmp_path / 'unused'}\n  vocab_size: 300\n")

    result = run_cli("--config", str(config), "--data", str(data_dir), "--out", str(tmp_path / "tok"))

    assert result.exit_code == 0, result.output
    assert TokenStore(tmp_path / "tok").vocab_size == 300
    assert not (tmp_path / "unused").exists()


def test_cli_vocab_too_small(data_dir: Path, tmp_path: Path):
    result = run_cli("--data", str(data_dir), "--out", str(tmp_path / "tok"), "--set", "tokenizer.vocab_size=100")

    assert_one_line_error(result, "tokenizer.vocab_size", "100", "258")
    assert not (tmp_path / "tok").exists()


def test_cli_missing_data_dir(tmp_path: Path):
    result = run_cli("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "tok"))

    assert_one_line_error(result, "data directory not found", "nowhere", "spikewalze prepare-data")
    assert not (tmp_path / "tok").exists()


def test_cli_data_dir_without_manifest(data_dir: Path, tmp_path: Path):
    (tmp_path / "data").mkdir()

    result = run_cli("--data", str(tmp_path / "data"), "--out", str(tmp_path / "tok"))

    assert_one_line_error(result, "no manifest.json", "spikewalze prepare-data")
    assert not (tmp_path / "tok").exists()


def test_prepare_data_then_build_tokenizer(shared_data: Path, tmp_path: Path):
    """The real pipeline: prepare-data on 20 articles, then build-tokenizer on its output."""
    import datasets

    data, out = tmp_path / "data", tmp_path / "tok"
    prepared = CliRunner().invoke(
        app,
        [
            "prepare-data",
            "--input", str(shared_data / "dewiki-articles.parquet"),
            "--max-articles", "20",
            "--out", str(data),
            "--set", "data.num_proc=1",
        ],
    )  # fmt: skip
    assert prepared.exit_code == 0, prepared.output

    result = run_cli("--data", str(data), "--out", str(out), "--set", "tokenizer.vocab_size=512")

    assert result.exit_code == 0, result.output
    store = TokenStore(out)
    data_manifest = json.loads((data / "manifest.json").read_text())
    rows = datasets.load_from_disk(str(data / "units")).select_columns(["text", "split", "stage"]).to_list()
    assert store.stages == ["A", "B", "C", "D"]
    for split in ("train", "validation"):
        for stage in store.stages:
            texts = [row["text"] for row in rows if row["split"] == split and row["stage"] == stage]
            units, tokens = store.units(split, stage), store.tokens(split, stage)
            assert len(units) == len(texts) == data_manifest["counts"][split][stage]["units"]
            if split != "validation":
                continue
            for text, unit in zip(texts, units):
                ids = tokens[unit["offset"] : unit["offset"] + unit["length"]].tolist()
                assert store.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert store.manifest["validation"]["round_trip_failures"] == 0
    assert 1.0 < store.manifest["bytes_per_token"] < 4.0


@pytest.mark.slow
@pytest.mark.parametrize("phase_marker", [".tok.partial", ".tok.partial/tokenizer.json"], ids=["training", "tokenizing"])
def test_sigkill_then_rerun_is_identical(shared_data: Path, tmp_path: Path, phase_marker: str):
    """SIGKILL a real build-tokenizer process while it trains or tokenizes, then rerun it."""
    import signal
    import subprocess
    import sys
    import time

    from test_tokenizer import tree_digest

    data_dir = write_data_dir(tmp_path / "data", shared_data / "dewiki-articles.parquet", articles=120)
    reference = tmp_path / "reference"
    flags = ["--data", str(data_dir), "--set", "tokenizer.vocab_size=2000"]
    assert run_cli(*flags, "--out", str(reference)).exit_code == 0

    out = tmp_path / "tok"
    command = [sys.executable, "-m", "spikewalze_cli", "build-tokenizer", *flags, "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not (tmp_path / phase_marker).exists():
        time.sleep(0.005)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()

    assert process.returncode == -signal.SIGKILL, "the build finished before the kill"
    assert not out.exists()
    assert (tmp_path / ".tok.partial").is_dir()
    assert not (tmp_path / ".tok.partial" / "manifest.json").exists()

    assert run_cli(*flags, "--out", str(out)).exit_code == 0
    assert tree_digest(out) == tree_digest(reference)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "reference", "tok"]
