"""`spikewalze train` and `resume` on bad input: one error line, exit 2, no checkpoint lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_TRAIN_OVERRIDES
from spikewalze_cli.checkpoint import find_checkpoints, verify_checkpoint
from spikewalze_cli.cli import app
from spikewalze_cli.config import load_config
from spikewalze_cli.tokenizer import build_tokenizer
from spikewalze_cli.training import train


# One torch thread: results then do not depend on the core count or on other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished_run(tiny_run_inputs, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("errors_run") / "run"
    config = load_config(
        None,
        [*TINY_TRAIN_OVERRIDES, f"train.data='{tiny_run_inputs.data}'", f"train.tokenizer='{tiny_run_inputs.tokenizer}'", f"train.out='{out}'"],
    )
    return train(config)


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def sets(*overrides: str) -> list[str]:
    args = []
    for override in overrides:
        args += ["--set", override]
    return args


def train_cli(data: Path, tokenizer: Path, out: Path, *overrides: str):
    args = ["train", "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(out), *sets(*TINY_TRAIN_OVERRIDES, *overrides)]
    return CliRunner().invoke(app, args)


def resume_cli(run_dir: Path, *args: str):
    return CliRunner().invoke(app, ["resume", str(run_dir), *args])


def assert_one_line_error(result, *fragments: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").iterdir())


def test_cli_trains_and_resumes(tiny_run_inputs, tmp_path: Path):
    run_dir = tmp_path / "run"

    result = train_cli(tiny_run_inputs.data, tiny_run_inputs.tokenizer, run_dir, "train.max_steps=3")
    assert result.exit_code == 0, result.output
    assert "validation:" in result.output

    result = resume_cli(run_dir, "--set", "train.max_steps=4")
    assert result.exit_code == 0, result.output
    assert checkpoint_names(run_dir) == ["best", "step-00000003", "step-00000004"]


def test_missing_prepared_data(tiny_run_inputs, tmp_path: Path):
    result = train_cli(tmp_path / "nothing", tiny_run_inputs.tokenizer, tmp_path / "run")

    assert_one_line_error(result, "prepared data directory not found", str(tmp_path / "nothing"), "prepare-data")
    assert not (tmp_path / "run").exists()


def test_missing_tokenizer(tiny_run_inputs, tmp_path: Path):
    result = train_cli(tiny_run_inputs.data, tmp_path / "nothing", tmp_path / "run")

    assert_one_line_error(result, "tokenizer directory not found", "build-tokenizer")


def test_data_from_another_tokenizer(tiny_run_inputs, tmp_path: Path):
    other = Path(shutil.copytree(tiny_run_inputs.data, tmp_path / "other-data"))
    manifest = other / "manifest.json"
    manifest.write_text(manifest.read_text().replace("{", '{"edited": true, ', 1))

    result = train_cli(other, tiny_run_inputs.tokenizer, tmp_path / "run")

    assert_one_line_error(result, "was built from other data than", str(other.resolve()))


def test_unwritable_run_directory(tiny_run_inputs, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    result = train_cli(tiny_run_inputs.data, tiny_run_inputs.tokenizer, blocker / "run")

    assert_one_line_error(result, str(blocker / "run"))


def test_batch_larger_than_data(tiny_run_inputs, tmp_path: Path):
    result = train_cli(tiny_run_inputs.data, tiny_run_inputs.tokenizer, tmp_path / "run", "train.batch_tokens=134217728")

    assert_one_line_error(result, "train.batch_tokens (134217728) is larger than the whole training split")


def test_batch_not_multiple_of_micro_batch(tiny_run_inputs, tmp_path: Path):
    result = train_cli(tiny_run_inputs.data, tiny_run_inputs.tokenizer, tmp_path / "run", "train.batch_tokens=300")

    assert_one_line_error(result, "train.batch_tokens (300) must be a positive multiple", "train.batch_tokens=256")


def test_train_into_existing_run(tiny_run_inputs, run_copy: Path):
    before = checkpoint_names(run_copy)

    result = train_cli(tiny_run_inputs.data, tiny_run_inputs.tokenizer, run_copy)

    assert_one_line_error(result, "already contains a run", f"spikewalze resume {run_copy}")
    assert checkpoint_names(run_copy) == before


def test_resume_corrupt_checkpoint(run_copy: Path):
    newest = run_copy / "checkpoints" / "step-00000006"
    raw = bytearray((newest / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (newest / "model.safetensors").write_bytes(bytes(raw))

    result = resume_cli(run_copy, "--checkpoint", str(newest))

    assert_one_line_error(result, "is corrupt", "model.safetensors")
    assert checkpoint_names(run_copy) == ["best", "step-00000003", "step-00000006"]

    # Without --checkpoint the corrupt one is skipped (and kept), and the run resumes from step 3.
    result = resume_cli(run_copy)
    assert result.exit_code == 0, result.output
    assert "skipping checkpoint" in result.output
    assert (newest / "model.safetensors").is_file()


def test_resume_truncated_checkpoint(run_copy: Path):
    newest = run_copy / "checkpoints" / "step-00000006"
    with (newest / "state.json").open("r+b") as handle:
        handle.truncate(100)

    result = resume_cli(run_copy, "--checkpoint", str(newest))

    assert_one_line_error(result, "is corrupt", "state.json has 100 bytes")


def test_resume_changed_model(run_copy: Path):
    result = resume_cli(run_copy, *sets("model.d_model=64", "train.max_steps=8"))

    assert_one_line_error(result, "cannot resume with a changed model", "model.d_model (32 -> 64)")
    assert len(find_checkpoints(run_copy)[0]) == 2


def test_resume_changed_tokenizer(run_copy: Path, tiny_run_inputs, tmp_path: Path):
    config = load_config(None, [f"tokenizer.data='{tiny_run_inputs.data}'", f"tokenizer.out='{tmp_path / 'tok'}'", "tokenizer.vocab_size=400"])
    build_tokenizer(config)

    result = resume_cli(run_copy, *sets(f"train.tokenizer='{tmp_path / 'tok'}'", "train.max_steps=8"))

    assert_one_line_error(result, "the tokenizer in", "changed since the run started")


def test_resume_changed_dataset(run_copy: Path, tiny_run_inputs, tmp_path: Path):
    other = Path(shutil.copytree(tiny_run_inputs.data, tmp_path / "other-data"))
    manifest = other / "manifest.json"
    manifest.write_text(manifest.read_text().replace("{", '{"edited": true, ', 1))

    result = resume_cli(run_copy, *sets(f"train.data='{other}'", "train.max_steps=8"))

    assert_one_line_error(result, "the dataset in", "changed since the run started")


def test_resume_not_a_run(tmp_path: Path):
    (tmp_path / "plain").mkdir()

    result = resume_cli(tmp_path / "plain")

    assert_one_line_error(result, "run description (run.json) not found")


def test_resume_without_complete_checkpoint(run_copy: Path):
    for directory in find_checkpoints(run_copy)[0]:
        (directory / "manifest.json").unlink()

    result = resume_cli(run_copy)

    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: no complete checkpoint")
    verify_checkpoint(run_copy / "checkpoints" / "best")
