"""`spikewalze generate` through the command line on real tiny trained runs, and its bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spikewalze_cli.cli import app
from spikewalze_cli.io import sha256_file

PROMPT = "Die Stadt Aachen"


# One torch thread: results then do not depend on the core count or on other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


def generate(*args: str, input: str | None = None):
    return CliRunner().invoke(app, ["generate", *args], input=input)


def flat(text: str) -> str:
    """Return `text` with line breaks and runs of spaces as single spaces, undoing rich's wrapping."""
    return " ".join(text.split())


def assert_one_line_error(result, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]


def test_same_seed_same_text(tiny_trained_run: Path):
    args = [str(tiny_trained_run), "--prompt", PROMPT, "--max-new-tokens", "30", "--temperature", "1.0"]
    first = generate(*args, "--seed", "5")
    second = generate(*args, "--seed", "5")
    other = generate(*args, "--seed", "6")

    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    assert first.stdout != other.stdout
    assert first.stdout.startswith(PROMPT)
    assert len(first.stdout) > len(PROMPT) + 1
    assert "tokens/s" in first.stderr
    assert "spike rate" in first.stderr


def test_greedy_text_is_the_decoded_ids(tiny_trained_run: Path):
    from spikewalze_cli.checkpoint import load_for_inference
    from spikewalze_cli.config import GenerateConfig
    from spikewalze_cli.generation import stream_tokens

    result = generate(str(tiny_trained_run), "--prompt", PROMPT, "--max-new-tokens", "25", "--temperature", "0")
    assert result.exit_code == 0, result.output

    loaded = load_for_inference(tiny_trained_run)
    store = loaded.tokens
    settings = GenerateConfig(temperature=0.0, max_new_tokens=25)
    prompt_ids = [store.doc_id, *store.tokenizer.encode(PROMPT, add_special_tokens=False).ids]
    ids = [t.id for t in stream_tokens(loaded.model, prompt_ids, settings, stop_ids=[store.doc_id], banned_ids=[store.pad_id])]
    assert result.stdout == PROMPT + store.tokenizer.decode(ids, skip_special_tokens=False) + "\n"


def test_config_file_and_set_choose_sampling(tiny_trained_run: Path, tmp_path: Path):
    config = tmp_path / "sampling.yaml"
    config.write_text("model:\n  n_layer: 9\ngenerate:\n  temperature: 0.0\n  max_new_tokens: 7\n")

    from_file = generate(str(tiny_trained_run), "--prompt", PROMPT, "--config", str(config))
    overridden = generate(str(tiny_trained_run), "--prompt", PROMPT, "--config", str(config), "--set", "generate.max_new_tokens=3")

    assert from_file.exit_code == 0, from_file.output
    assert overridden.exit_code == 0, overridden.output
    assert overridden.stdout.startswith(PROMPT)
    # Greedy decoding: the 3-token continuation is the start of the 7-token one (unless <|doc|> came first).
    assert from_file.stdout.startswith(overridden.stdout.rstrip("\n"))
    assert int(re.search(r"(\d+) tokens", from_file.stderr).group(1)) <= 7
    assert int(re.search(r"(\d+) tokens", overridden.stderr).group(1)) <= 3


def test_show_spikes_prints_legend_and_rate(tiny_trained_run: Path):
    result = generate(str(tiny_trained_run), "--prompt", PROMPT, "--max-new-tokens", "10", "--show-spikes")
    assert result.exit_code == 0, result.output
    assert "expert layers per token: 0 1 2" in flat(result.stderr)
    assert "spike rate" in result.stderr
    assert result.stdout.startswith(PROMPT)


def test_prompts_from_stdin_one_per_line(tiny_trained_run: Path):
    lines = "Die Stadt Aachen\n\n\x01\x02\nBerlin ist\n"
    result = generate(str(tiny_trained_run), "--max-new-tokens", "5", "--temperature", "0", input=lines)

    assert result.exit_code == 0, result.output
    outputs = result.stdout.split("\n\n")
    assert len(outputs) == 2
    assert outputs[0].startswith("Die Stadt Aachen")
    assert outputs[1].startswith("Berlin ist")
    assert "stdin line 3 contains no text" in flat(result.stderr)


def test_stdin_without_prompt_is_an_error(tiny_trained_run: Path):
    assert_one_line_error(generate(str(tiny_trained_run), input="\n \n"), "stdin contained no prompt")


def test_gpt_generates_and_crops_long_prompt(tiny_trained_gpt_run: Path):
    long_prompt = "Aachen liegt im Westen. " * 30  # more than the 64-token context
    result = generate(str(tiny_trained_gpt_run), "--prompt", long_prompt, "--max-new-tokens", "80", "--show-spikes")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(long_prompt)
    assert "fed only the last 64" in flat(result.stderr)
    assert "no spike gate" in flat(result.stderr)


# ----------------------------------------------------------------------------------------------
# Bad and unusual input


@pytest.mark.parametrize(
    "prompt",
    [
        "The quick brown fox jumps over the lazy dog.",
        "東京は日本の首都です。",
        "Emoji 😀🇩🇪 und ein Ω",
        "a",
    ],
)
def test_non_german_prompts_work(tiny_trained_run: Path, prompt: str):
    result = generate(str(tiny_trained_run), "--prompt", prompt, "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(prompt)


def test_control_characters_are_removed(tiny_trained_run: Path):
    result = generate(str(tiny_trained_run), "--prompt", "Die\x00 Stadt\x07 Aachen\x1b", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Die Stadt Aachen")
    assert "removed 3 control characters" in flat(result.stderr)


@pytest.mark.parametrize("prompt", ["", "   ", "\x00\x01\x1b"])
def test_empty_prompt_is_an_error(tiny_trained_run: Path, prompt: str):
    assert_one_line_error(generate(str(tiny_trained_run), "--prompt", prompt), "prompt is empty")


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [
        ("--temperature", "-1", "generate.temperature"),
        ("--top-p", "0", "generate.top_p"),
        ("--top-p", "1.5", "generate.top_p"),
        ("--top-k", "0", "generate.top_k"),
        ("--max-new-tokens", "0", "generate.max_new_tokens"),
        ("--repetition-penalty", "0.5", "generate.repetition_penalty"),
    ],
)
def test_invalid_sampling_values(tiny_trained_run: Path, flag: str, value: str, key: str):
    assert_one_line_error(generate(str(tiny_trained_run), "--prompt", PROMPT, flag, value), key)


def test_model_override_is_rejected(tiny_trained_run: Path):
    result = generate(str(tiny_trained_run), "--prompt", PROMPT, "--set", "model.context=128")
    assert_one_line_error(result, "model.context", "only eval.* and generate.*")


def test_missing_checkpoint(tmp_path: Path):
    assert_one_line_error(generate(str(tmp_path / "nowhere"), "--prompt", PROMPT), "not found")


def test_corrupt_checkpoint(tiny_trained_run: Path, tmp_path: Path):
    run = shutil.copytree(tiny_trained_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-00000030"
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] + bytes(100))

    assert_one_line_error(generate(str(checkpoint), "--prompt", PROMPT), "corrupt")


def test_tokenizer_that_does_not_match(tiny_trained_run: Path, tiny_run_inputs, tmp_path: Path):
    # A second, valid tokenizer directory with one merge fewer, and a checkpoint that points to it.
    tokenizer_dir = shutil.copytree(tiny_run_inputs.tokenizer, tmp_path / "tokenizer")
    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokenizer_json["model"]["merges"] = tokenizer_json["model"]["merges"][:-1]
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    manifest = json.loads((tokenizer_dir / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = sha256_file(tokenizer_dir / "tokenizer.json")
    (tokenizer_dir / "manifest.json").write_text(json.dumps(manifest))

    checkpoint = shutil.copytree(tiny_trained_run / "checkpoints" / "step-00000030", tmp_path / "checkpoint")
    state = json.loads((checkpoint / "state.json").read_text())
    state["tokenizer_dir"] = str(tokenizer_dir)
    (checkpoint / "state.json").write_text(json.dumps(state))
    checkpoint_manifest = json.loads((checkpoint / "manifest.json").read_text())
    checkpoint_manifest["files"]["state.json"] = {
        "bytes": (checkpoint / "state.json").stat().st_size,
        "sha256": sha256_file(checkpoint / "state.json"),
    }
    (checkpoint / "manifest.json").write_text(json.dumps(checkpoint_manifest))

    assert_one_line_error(generate(str(checkpoint), "--prompt", PROMPT), "tokenizer", "not the one")


def test_interactive_loop(tiny_trained_run: Path, monkeypatch, capsys):
    from spikewalze_cli import generation
    from spikewalze_cli.checkpoint import load_for_inference
    from spikewalze_cli.config import GenerateConfig

    # What a user types: a prompt, Ctrl-C at the prompt, blank and control-only lines, a prompt, Ctrl-D.
    typed = iter(["Die Stadt Aachen", KeyboardInterrupt(), "   ", "\x00\x01", "Berlin", EOFError()])

    def fake_input(prompt: str = "") -> str:
        entry = next(typed)
        if isinstance(entry, BaseException):
            raise entry
        return entry

    monkeypatch.setattr("builtins.input", fake_input)
    loaded = load_for_inference(tiny_trained_run)
    session = generation.GenerationSession(loaded, GenerateConfig(temperature=0.0, max_new_tokens=6), torch.device("cpu"), False)
    generation._interactive(session)

    captured = capsys.readouterr()
    assert captured.err.count("tokens/s") == 2
    assert "prompt is empty" in captured.err
    assert "Die Stadt" not in captured.out  # typed prompts are not echoed
    assert captured.out.count("\n") == 2
