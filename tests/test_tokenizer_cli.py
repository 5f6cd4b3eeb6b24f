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
