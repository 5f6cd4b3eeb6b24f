"""Bad input through the command line, in one table: config, data, models and prompts.

Every case runs the real command in-process with typer's CliRunner and checks what a user sees: a
non-zero exit where the command cannot go on, exactly one line that names the bad file, key or
value, no traceback without --debug, and no output directory that a later command accepts as
complete. Inputs the command can handle (duplicates, control characters in a prompt) exit 0 and
say in one line what was done about them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_model
from typer.testing import CliRunner

from conftest import TINY_TRAIN_OVERRIDES
from spikewalze_cli.cli import app
from spikewalze_cli.config import load_config, validate_config
from spikewalze_cli.errors import UserError
from spikewalze_cli.io import sha256_file
from spikewalze_cli.tokenizer import TokenStore, open_units

REPO = Path(__file__).resolve().parents[1]


# One torch thread: results then do not depend on the core count or on other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Call:
    """One command line to run, what its output must contain, and the outputs no later command may accept."""

    args: list[str]
    fragments: list[str]
    exit_code: int = 2
    data_dirs: list[Path] = field(default_factory=list)  # must not open as prepared data
    tokenizer_dirs: list[Path] = field(default_factory=list)  # must not open as a tokenizer
    files: list[Path] = field(default_factory=list)  # must not exist
    check: Callable[[], None] | None = None  # extra checks for a command that went on


@dataclass
class World:
    """Inputs shared by the cases: a scratch folder, the real data and trained runs."""

    root: Path
    shared_data: Path
    inputs: object  # TinyRunInputs
    trained_run: Path
    rebuilt_tokenizer_run: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data, tiny_run_inputs, tiny_trained_run) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    return World(root, shared_data, tiny_run_inputs, tiny_trained_run, _run_with_rebuilt_tokenizer(root, tiny_run_inputs))


def _run_with_rebuilt_tokenizer(root: Path, inputs) -> Path:
    """Train 3 steps with a copy of the tokenizer, then rebuild that copy with another vocabulary."""
    from spikewalze_cli.tokenizer import build_tokenizer
    from spikewalze_cli.training import train

    tokenizer = root / "own-tokenizer"
    shutil.copytree(inputs.tokenizer, tokenizer)
    run = root / "run-with-own-tokenizer"
    paths = [f"train.data='{inputs.data}'", f"train.tokenizer='{tokenizer}'", f"train.out='{run}'"]
    train(load_config(None, [*TINY_TRAIN_OVERRIDES, *paths, "train.max_steps=3"]))

    build_tokenizer(load_config(None, [f"tokenizer.data='{inputs.data}'", f"tokenizer.out='{tokenizer}'", "tokenizer.vocab_size=300"]))
    return run


# ----------------------------------------------------------------------------------------------
# Config


def config_call(world: World, name: str, yaml_text: str, *fragments: str) -> Call:
    config = world.root / f"{name}.yaml"
    config.write_text(yaml_text, encoding="utf-8")
    out = world.root / f"{name}-data"
    args = ["prepare-data", "--config", str(config), "--input", str(world.shared_data / "dewiki-articles.parquet"), "--out", str(out)]
    return Call(args, [str(config), *fragments], data_dirs=[out])


def unknown_key(world: World) -> Call:
    return config_call(world, "unknown-key", "train:\n  learning_rate: 0.001\n", "unknown config key", "train.learning_rate")


def wrong_type(world: World) -> Call:
    return config_call(world, "wrong-type", "train:\n  max_steps: viele\n", "train.max_steps", "'viele'")


def negative_learning_rate(world: World) -> Call:
    return config_call(world, "negative-lr", "train:\n  lr: -0.001\n", "train.lr", "-0.001")


def window_larger_than_context(world: World) -> Call:
    return config_call(world, "window", "model:\n  context: 32\n  window: 64\n", "window (64)", "context (32)")


def zero_layers(world: World) -> Call:
    return config_call(world, "zero-layers", "model:\n  n_layer: 0\n", "model.n_layer", "0")


def vocab_below_bytes_and_specials(world: World) -> Call:
    return config_call(world, "small-vocab", "tokenizer:\n  vocab_size: 257\n", "tokenizer.vocab_size", "257", "258")


def yaml_syntax_error(world: World) -> Call:
    # Line 3 is indented deeper than its sibling, which YAML reads as a mapping inside a value.
    return config_call(world, "syntax", "train:\n  lr: 0.001\n   max_steps: 10\n", "YAML syntax error", "line 3")


# ----------------------------------------------------------------------------------------------
# Data


def data_call(world: World, path: Path, *fragments: str) -> Call:
    out = world.root / f"{path.name}-data"
    args = ["prepare-data", "--input", str(path), "--out", str(out), "--set", "data.num_proc=1"]
    return Call(args, [str(path), *fragments], data_dirs=[out, out.parent / f".{out.name}.partial"])


def empty_text_file(world: World) -> Call:
    path = world.root / "leer.txt"
    path.write_bytes(b"")
    return data_call(world, path, "input file is empty")


def empty_parquet_file(world: World) -> Call:
    path = world.root / "leer.parquet"
    path.write_bytes(b"")
    return data_call(world, path, "input file is empty")


def empty_jsonl_file(world: World) -> Call:
    path = world.root / "leer.jsonl"
    path.write_bytes(b"")
    return data_call(world, path, "input file is empty")


def binary_file(world: World) -> Call:
    path = world.root / "zufall.jsonl"
    path.write_bytes(random.Random(7).randbytes(64 * 1024))
    return data_call(world, path)


def binary_xml_file(world: World) -> Call:
    path = world.root / "zufall.xml"
    path.write_bytes(random.Random(8).randbytes(64 * 1024))
    return data_call(world, path, "malformed XML")


def non_utf8_bytes(world: World) -> Call:
    path = world.root / "latin1.txt"
    path.write_bytes(("Die Brücke über die Straße ist größer als gedacht. " * 20).encode("latin-1"))
    return data_call(world, path, "UTF-8")


def truncated_bz2(world: World) -> Call:
    path = world.root / "abgeschnitten.xml.bz2"
    data = (world.shared_data / "dewiki-20170701-sample.xml.bz2").read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return data_call(world, path, "truncated")


def malformed_xml(world: World) -> Call:
    path = world.root / "kaputt.xml"
    path.write_text(
        "<mediawiki>\n<page><title>Aachen</title><ns>0</ns><id>1</id>\n<revision><text>Aachen ist eine Stadt.</revision>\n</page>\n",
        encoding="utf-8",
    )
    return data_call(world, path, "malformed XML", "line 3")


def parquet_without_text(world: World) -> Call:
    path = world.root / "ohne-text.parquet"
    pq.write_table(pa.table({"id": ["1"], "title": ["Aachen"], "body": ["Aachen ist eine Stadt."]}), path)
    return data_call(world, path, "no 'text' column")


def duplicate_articles(world: World) -> Call:
    """Every article twice under another id: prepare-data goes on and keeps each paragraph once."""
    articles = pq.read_table(world.shared_data / "dewiki-articles.parquet").slice(0, 6)
    copies = articles.set_column(0, "id", pa.array([f"{value}-kopie" for value in articles.column("id").to_pylist()]))
    path = world.root / "doppelt.parquet"
    pq.write_table(pa.concat_tables([articles, copies]), path)
    out = world.root / "doppelt-data"

    def every_unit_once() -> None:
        texts = open_units(out)["text"]
        assert len(texts) == len(set(texts))
        assert json.loads((out / "manifest.json").read_text())["paragraphs"]["duplicates_removed"] > 0

    args = ["prepare-data", "--input", str(path), "--out", str(out), "--set", "data.num_proc=1"]
    return Call(args, ["duplicate paragraphs removed"], exit_code=0, check=every_unit_once)


# ----------------------------------------------------------------------------------------------
# Models


def copy_checkpoint(world: World, name: str) -> Path:
    source = sorted((world.trained_run / "checkpoints").glob("step-*"))[-1]
    target = world.root / name
    shutil.copytree(source, target)
    return target


def rewrite_manifest(checkpoint: Path) -> None:
    """Record the current size and hash of every file, so the manifest check passes and the loader is what rejects the file."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"bytes": (checkpoint / name).stat().st_size, "sha256": sha256_file(checkpoint / name)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def replace_weights(checkpoint: Path, vocab_size: int, **model_changes) -> None:
    """Overwrite the weights with those of a fresh model that differs from the trained one."""
    from spikewalze_cli.model import build_model

    state = json.loads((checkpoint / "state.json").read_text())
    model_config = validate_config(state["config"]).model.model_copy(update=model_changes)
    save_model(build_model(model_config, vocab_size), str(checkpoint / "model.safetensors"))
    rewrite_manifest(checkpoint)


def evaluate_call(world: World, checkpoint: Path, *fragments: str) -> Call:
    report = world.root / f"{checkpoint.name}.json"
    return Call(["evaluate", str(checkpoint), "--json", str(report)], list(fragments), files=[report])


def checkpoint_of_other_architecture(world: World) -> Call:
    checkpoint = copy_checkpoint(world, "gpt-weights")
    replace_weights(checkpoint, TokenStore(world.inputs.tokenizer).vocab_size, arch="gpt")
    return evaluate_call(world, checkpoint, str(checkpoint / "model.safetensors"), "do not match the model")


def checkpoint_of_other_vocab_size(world: World) -> Call:
    checkpoint = copy_checkpoint(world, "other-vocab-weights")
    replace_weights(checkpoint, 300)
    return evaluate_call(world, checkpoint, str(checkpoint / "model.safetensors"))


def truncated_safetensors(world: World) -> Call:
    checkpoint = copy_checkpoint(world, "truncated")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return evaluate_call(world, checkpoint, "corrupt", "model.safetensors")


def truncated_safetensors_with_matching_manifest(world: World) -> Call:
    checkpoint = copy_checkpoint(world, "truncated-rehashed")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rewrite_manifest(checkpoint)
    return evaluate_call(world, checkpoint, str(weights))


def resume_from_other_architecture(world: World) -> Call:
    checkpoint = copy_checkpoint(world, "gpt-state")
    state = json.loads((checkpoint / "state.json").read_text())
    state["config"]["model"]["arch"] = "gpt"
    (checkpoint / "state.json").write_text(json.dumps(state))
    rewrite_manifest(checkpoint)
    run = world.root / "resume-other-arch"
    shutil.copytree(world.trained_run, run)
    return Call(["resume", str(run), "--checkpoint", str(checkpoint)], [str(checkpoint / "model.safetensors"), "do not match the model"])


def tokenizer_from_another_build(world: World) -> Call:
    run = world.rebuilt_tokenizer_run
    report = world.root / "rebuilt-tokenizer.json"
    return Call(["evaluate", str(run), "--json", str(report)], ["own-tokenizer", "not the one this model was trained with"], files=[report])


def resume_with_another_tokenizer(world: World) -> Call:
    return Call(["resume", str(world.rebuilt_tokenizer_run)], ["own-tokenizer", "tokenizer", "changed"])


# ----------------------------------------------------------------------------------------------
# Prompts


def generate_call(world: World, prompt: str, *fragments: str, exit_code: int = 2) -> Call:
    args = ["generate", str(world.trained_run), "--prompt", prompt, "--max-new-tokens", "4", "--temperature", "0"]
    return Call(args, list(fragments), exit_code=exit_code)


def empty_prompt(world: World) -> Call:
    return generate_call(world, "", "prompt is empty")


def prompt_with_nul_bytes(world: World) -> Call:
    return generate_call(world, "Aachen\x00 ist\x00 eine Stadt", "removed 2 control characters", exit_code=0)


def prompt_with_control_characters(world: World) -> Call:
    return generate_call(world, "\x1b[1mAachen\x07 liegt\x08 im Westen", "removed 3 control characters", exit_code=0)


def prompt_of_only_control_characters(world: World) -> Call:
    return generate_call(world, "\x00\x07\x1b", "prompt is empty")


def prompt_of_100000_characters(world: World) -> Call:
    prompt = ("Aachen liegt im Westen. " * 5000)[:100_000]
    return Call(
        ["generate", str(world.trained_run), "--prompt", prompt, "--max-new-tokens", "2", "--temperature", "0"],
        ["tokens/s"],
        exit_code=0,
    )


CASES = [
    pytest.param(unknown_key, id="config-unknown-key"),
    pytest.param(wrong_type, id="config-wrong-type"),
    pytest.param(negative_learning_rate, id="config-negative-lr"),
    pytest.param(window_larger_than_context, id="config-window-over-context"),
    pytest.param(zero_layers, id="config-zero-layers"),
    pytest.param(vocab_below_bytes_and_specials, id="config-vocab-257"),
    pytest.param(yaml_syntax_error, id="config-yaml-syntax"),
    pytest.param(empty_text_file, id="data-empty-txt"),
    pytest.param(empty_parquet_file, id="data-empty-parquet"),
    pytest.param(empty_jsonl_file, id="data-empty-jsonl"),
    pytest.param(binary_file, id="data-binary-jsonl"),
    pytest.param(binary_xml_file, id="data-binary-xml"),
    pytest.param(non_utf8_bytes, id="data-latin1"),
    pytest.param(truncated_bz2, id="data-truncated-bz2"),
    pytest.param(malformed_xml, id="data-malformed-xml"),
    pytest.param(parquet_without_text, id="data-parquet-no-text"),
    pytest.param(duplicate_articles, id="data-duplicates"),
    pytest.param(checkpoint_of_other_architecture, id="model-other-arch"),
    pytest.param(checkpoint_of_other_vocab_size, id="model-other-vocab"),
    pytest.param(truncated_safetensors, id="model-truncated"),
    pytest.param(truncated_safetensors_with_matching_manifest, id="model-truncated-rehashed"),
    pytest.param(resume_from_other_architecture, id="model-resume-other-arch"),
    pytest.param(tokenizer_from_another_build, id="model-rebuilt-tokenizer"),
    pytest.param(resume_with_another_tokenizer, id="model-resume-rebuilt-tokenizer"),
    pytest.param(empty_prompt, id="prompt-empty"),
    pytest.param(prompt_with_nul_bytes, id="prompt-nul"),
    pytest.param(prompt_with_control_characters, id="prompt-control"),
    pytest.param(prompt_of_only_control_characters, id="prompt-only-control"),
    # Tens of thousands of tokens fed one at a time through the decoding state: about 40 s on one core.
    pytest.param(prompt_of_100000_characters, id="prompt-100k", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("make_call", CASES)
def test_bad_input(make_call, world: World):
    call = make_call(world)

    result = CliRunner().invoke(app, call.args)

    output = result.output
    assert result.exit_code == call.exit_code, output
    assert "Traceback" not in output
    if call.exit_code != 0:
        messages = [line for line in output.splitlines() if line.strip()]
        assert len(messages) == 1, output
        assert messages[0].startswith("error:"), output
        assert "internal error" not in messages[0]
    else:
        messages = [line for line in output.splitlines() if all(fragment in line for fragment in call.fragments)]
        assert len(messages) == 1, output
    for fragment in call.fragments:
        assert fragment in messages[0], messages[0]

    for directory in call.data_dirs:
        with pytest.raises(UserError):
            open_units(directory)
    for directory in call.tokenizer_dirs:
        with pytest.raises(UserError):
            TokenStore(directory)
    for path in call.files:
        assert not path.exists()
    if call.check is not None:
        call.check()


def test_debug_shows_traceback(world: World):
    call = unknown_key(world)

    result = CliRunner().invoke(app, [*call.args, "--debug"])

    assert result.exit_code == 2
    assert "Traceback" in result.output
    assert "train.learning_rate" in result.output


# Runs the command and prints its peak resident memory (VmHWM, in kB) when it exits. The child's
# own figure is needed: ru_maxrss of a child also counts the pytest process it was forked from.
PEAK_MEMORY_WRAPPER = """
import atexit, runpy, sys

def report_peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("peak " + line.split()[1] + "\\n")

atexit.register(report_peak)
sys.argv = ["spikewalze", *sys.argv[1:]]
runpy.run_module("spikewalze_cli", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc (Linux)")
def test_fifty_megabyte_line_bounded_memory(tmp_path: Path):
    """One 50 MB line without a newline becomes units of at most 2,000 characters, with peak memory under 1 GiB (about 0.3 GiB measured)."""
    path = tmp_path / "eine-zeile.txt"
    path.write_text(("Die Stadt liegt am Fluss und hat viele Brücken " * 1_100_000)[:50_000_000], encoding="utf-8")
    out = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_WRAPPER, "prepare-data", "--input", str(path), "--out", str(out), "--set", "data.num_proc=1"],
        capture_output=True, text=True, env=env, timeout=300,
    )

    assert result.returncode == 0, result.stderr
    units = open_units(out)
    assert len(units) > 20_000
    assert max(len(text) for text in units["text"]) <= 2000
    peak_kib = int(result.stderr.rsplit("peak ", 1)[1].split()[0])
    assert peak_kib < 1 << 20, f"peak resident memory {peak_kib / 1024:.0f} MiB"
