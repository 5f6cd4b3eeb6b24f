"""`spikewalze evaluate`: windows, byte counts, and the figures of a real tiny trained run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from spikewalze_cli.checkpoint import load_for_inference
from spikewalze_cli.cli import app
from spikewalze_cli.config import Config
from spikewalze_cli.errors import UserError
from spikewalze_cli.evaluation import StageStream, evaluate, inference_config, scored_bytes, spread, token_windows
from spikewalze_cli.tokenizer import UNIT_DTYPE
from test_tokenizer import write_data_dir

RESULT_KEYS = {
    "context",
    "gate_mode",
    "loss",
    "perplexity",
    "bits_per_byte",
    "tokens",
    "bytes",
    "spike_rate",
    "spike_rate_per_layer",
    "flops_per_token",
    "flops_per_token_dense",
    "tokens_per_second",
    "per_stage",
}
STAGE_KEYS = {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "spike_rate", "spike_rate_per_layer"}


# One torch thread: results then do not depend on the core count or on other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


def unit_index(rows: list[tuple[int, int, int]]) -> np.ndarray:
    """Return a unit index of (offset, length, bytes) rows with score 0."""
    index = np.zeros(len(rows), dtype=UNIT_DTYPE)
    for i, (offset, length, size) in enumerate(rows):
        index[i] = (offset, length, size, 0.0)
    return index


# ----------------------------------------------------------------------------------------------
# Windows and bytes


def test_windows_cover_every_target_once():
    windows = token_windows(num_tokens=10, context=4)
    assert windows == [(0, 4), (4, 4), (8, 1)]
    targets = [position for start, length in windows for position in range(start + 1, start + 1 + length)]
    assert targets == list(range(1, 10))


def test_windows_of_tiny_streams():
    assert token_windows(num_tokens=9, context=4) == [(0, 4), (4, 4)]
    assert token_windows(num_tokens=1, context=4) == []
    assert token_windows(num_tokens=0, context=4) == []


def test_spread_picks_evenly_in_order():
    windows = [(i, 1) for i in range(10)]
    assert spread(windows, 4) == [(0, 1), (3, 1), (6, 1), (9, 1)]
    assert spread(windows, None) == windows
    assert spread(windows, 20) == windows


def test_scored_bytes_whole_and_cut_units():
    # Units of 4 tokens / 10 bytes at 1..4 and 2 tokens / 6 bytes at 6..7; token 5 lies between them.
    units = unit_index([(1, 4, 10), (6, 2, 6)])
    assert scored_bytes(units, [(1, 8)]) == 16.0
    assert scored_bytes(units, [(0, 100)]) == 16.0
    assert scored_bytes(units, [(1, 3)]) == 5.0  # half of the first unit
    assert scored_bytes(units, [(5, 6)]) == 0.0  # the token between units
    assert scored_bytes(units, [(4, 7)]) == 2.5 + 3.0
    assert scored_bytes(units, [(1, 3), (3, 5)]) == 10.0
    assert scored_bytes(units[:0], [(0, 5)]) == 0.0


def test_stage_stream_adds_doc_tokens():
    tokens = np.array([10, 11, 12, 20, 21], dtype=np.uint16)
    units = unit_index([(0, 3, 7), (3, 2, 5)])
    stream = StageStream("A", tokens, units, doc_id=0)
    assert len(stream) == 8
    assert stream.read(0, 8).tolist() == [0, 10, 11, 12, 0, 20, 21, 0]
    assert stream.read(3, 6).tolist() == [12, 0, 20]
    assert stream.read(7, 8).tolist() == [0]
    assert stream.units["offset"].tolist() == [1, 5]
    assert stream.units["length"].tolist() == [3, 2]
    # Every target but the <|doc|> tokens carries bytes; the full stream carries all of them.
    assert scored_bytes(stream.units, [(1, len(stream))]) == 12.0


def test_stage_stream_with_empty_units():
    tokens = np.array([10, 11], dtype=np.uint16)
    units = unit_index([(0, 0, 0), (0, 2, 4), (2, 0, 0)])
    stream = StageStream("A", tokens, units, doc_id=1)
    assert stream.read(0, len(stream)).tolist() == [1, 1, 10, 11, 1, 1]
    assert scored_bytes(stream.units, [(1, len(stream))]) == 4.0


# ----------------------------------------------------------------------------------------------
# Config merging


def test_inference_config_takes_eval_and_generate_from_file(tmp_path: Path):
    run_config = Config.model_validate({"model": {"n_layer": 2}, "eval": {"batch_size": 5}})
    path = tmp_path / "other.yaml"
    path.write_text("model:\n  n_layer: 6\neval:\n  batch_size: 3\ngenerate:\n  temperature: 0.0\n")

    config = inference_config(run_config, path, ["generate.top_k=7"])

    assert config.model.n_layer == 2
    assert config.eval.batch_size == 3
    assert config.generate.temperature == 0.0
    assert config.generate.top_k == 7


@pytest.mark.parametrize("override", ["model.n_layer=3", "data.num_stages=2", "train.lr=1.0", "eval=1"])
def test_inference_config_rejects_other_sections(override):
    with pytest.raises(UserError, match="only eval.* and generate.*"):
        inference_config(Config(), None, [override])


def test_inference_config_validates_values():
    with pytest.raises(UserError, match="generate.temperature"):
        inference_config(Config(), None, ["generate.temperature=-1"])
    with pytest.raises(UserError, match="contexts must be positive"):
        inference_config(Config(), None, ["eval.contexts=[0]"])


# ----------------------------------------------------------------------------------------------
# A real trained run

def independent_stage_loss(model, unit_ids: list[list[int]], doc_id: int, context: int, gate_mode: str) -> tuple[float, int]:
    """Return (summed cross-entropy in nats, targets) of one stage, computed without evaluation.py."""
    ids = [doc_id]
    for one_unit in unit_ids:
        ids += one_unit + [doc_id]
    nats, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, context):
            window = torch.tensor(ids[start : start + context + 1])
            logits = model(window[None, :-1], gate_mode=gate_mode).logits[0]
            nats += float(F.cross_entropy(logits, window[1:], reduction="sum"))
            count += len(window) - 1
    return nats, count


@pytest.fixture(scope="module")
def small_data(shared_data: Path, tmp_path_factory) -> Path:
    """A prepared data directory whose validation split is 2 real articles and a few hard strings."""
    return write_data_dir(tmp_path_factory.mktemp("small-data"), shared_data / "dewiki-articles.parquet", articles=10)


@pytest.fixture(scope="module")
def full_report(tiny_trained_run: Path, small_data: Path) -> dict:
    return evaluate(tiny_trained_run, overrides=["eval.batch_size=4"], data=small_data)


def test_loss_matches_independent_computation(tiny_trained_run: Path, small_data: Path, full_report: dict):
    import datasets

    loaded = load_for_inference(tiny_trained_run)
    tokenizer, doc_id = loaded.tokens.tokenizer, loaded.tokens.doc_id
    context = loaded.config.model.context
    texts: dict[str, list[str]] = {}
    for row in datasets.load_from_disk(str(small_data / "units")):
        if row["split"] == "validation":
            texts.setdefault(row["stage"], []).append(row["text"])
    assert [r["gate_mode"] for r in full_report["results"]] == ["soft", "hard"]
    assert sorted(full_report["results"][0]["per_stage"]) == sorted(texts)

    for result in full_report["results"]:
        total_nats, total_tokens, total_bytes = 0.0, 0, 0
        for stage, stage_texts in texts.items():
            unit_ids = [tokenizer.encode(text, add_special_tokens=False).ids for text in stage_texts]
            stage_bytes = sum(len(text.encode("utf-8")) for text in stage_texts)
            nats, count = independent_stage_loss(loaded.model, unit_ids, doc_id, context, result["gate_mode"])

            figures = result["per_stage"][stage]
            assert figures["tokens"] == count == sum(map(len, unit_ids)) + len(unit_ids)
            assert figures["loss"] == pytest.approx(nats / count, rel=1e-5)
            assert figures["bytes"] == pytest.approx(stage_bytes, rel=1e-12)
            assert figures["bits_per_byte"] == pytest.approx(nats / (stage_bytes * math.log(2)), rel=1e-5)
            total_nats += nats
            total_tokens += count
            total_bytes += stage_bytes

        assert result["tokens"] == total_tokens
        assert result["loss"] == pytest.approx(total_nats / total_tokens, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(total_nats / total_tokens), rel=1e-5)
        assert result["bits_per_byte"] == pytest.approx(total_nats / (total_bytes * math.log(2)), rel=1e-5)


def test_report_has_documented_keys(full_report: dict):
    assert {"target", "checkpoint", "step", "arch", "split", "settings", "results", "gaps"} <= set(full_report)
    for result in full_report["results"]:
        assert set(result) == RESULT_KEYS
        for figures in result["per_stage"].values():
            assert set(figures) == STAGE_KEYS
        assert len(result["spike_rate_per_layer"]) == 2
        assert result["spike_rate"] == pytest.approx(np.mean(result["spike_rate_per_layer"]))
        assert 0.0 <= result["spike_rate"] <= 1.0
        assert result["flops_per_token"] <= result["flops_per_token_dense"]

    soft, hard = full_report["results"]
    assert soft["flops_per_token"] == soft["flops_per_token_dense"]
    [gap] = full_report["gaps"]
    assert gap["loss"] == pytest.approx(hard["loss"] - soft["loss"])
    assert gap["spike_rate"] == pytest.approx(hard["spike_rate"] - soft["spike_rate"])


def test_hard_gate_spike_rate_counts_whole_tokens(tiny_trained_run: Path, full_report: dict):
    hard = full_report["results"][1]
    for figures in hard["per_stage"].values():
        for rate in figures["spike_rate_per_layer"]:
            spiked = rate * figures["tokens"]
            assert spiked == pytest.approx(round(spiked), abs=1e-6)


def test_evaluate_is_deterministic(tiny_trained_run: Path):
    overrides = ["eval.max_batches=1", "eval.batch_size=2", "eval.gate_modes=[hard]"]
    first = evaluate(tiny_trained_run, overrides=overrides)
    second = evaluate(tiny_trained_run, overrides=overrides)
    for a, b in zip(first["results"], second["results"]):
        a.pop("tokens_per_second")
        b.pop("tokens_per_second")
        assert a == b


def test_max_batches_limits_windows(tiny_trained_run: Path, small_data: Path, full_report: dict):
    overrides = ["eval.max_batches=1", "eval.batch_size=2", "eval.gate_modes=[soft]"]
    report = evaluate(tiny_trained_run, overrides=overrides, data=small_data)
    context = report["results"][0]["context"]
    for stage, figures in report["results"][0]["per_stage"].items():
        full = full_report["results"][0]["per_stage"][stage]
        # Two windows, the first and the last (which is shorter unless the targets fill it).
        last_window = full["tokens"] % context or context
        expected = full["tokens"] if full["tokens"] <= 2 * context else context + last_window
        assert figures["tokens"] == expected
        assert 0 < figures["bytes"] <= full["bytes"]


def test_several_contexts(tiny_trained_run: Path, tmp_path: Path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        ["evaluate", str(tiny_trained_run), "--context", "16", "--context", "128", "--json", str(out), "--set", "eval.max_batches=2"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [(r["context"], r["gate_mode"]) for r in report["results"]] == [(16, "soft"), (16, "hard"), (128, "soft"), (128, "hard")]
    assert [gap["context"] for gap in report["gaps"]] == [16, 128]
    assert "per curriculum stage" in result.stderr
    assert "hard minus soft gate, context 128" in result.stderr


def test_other_data_directory_gives_same_figures(tiny_trained_run: Path, tiny_run_inputs, tmp_path: Path):
    copy = tmp_path / "data-copy"
    shutil.copytree(tiny_run_inputs.data, copy)
    overrides = ["eval.max_batches=2", "eval.gate_modes=[hard]"]

    stored = evaluate(tiny_trained_run, overrides=overrides)
    tokenized_here = evaluate(tiny_trained_run, overrides=overrides, data=copy)

    assert tokenized_here["data_dir"] == str(copy.resolve())
    for a, b in zip(stored["results"], tokenized_here["results"]):
        assert a["per_stage"] == b["per_stage"]


def test_gpt_has_no_gate(tiny_trained_gpt_run: Path, tmp_path: Path):
    report = evaluate(tiny_trained_gpt_run, overrides=["eval.max_batches=1"], json_path=tmp_path / "gpt.json")
    assert json.loads((tmp_path / "gpt.json").read_text()) == report
    [result] = report["results"]
    assert result["gate_mode"] == "none"
    assert result["spike_rate"] is None
    assert result["spike_rate_per_layer"] is None
    assert result["flops_per_token"] == result["flops_per_token_dense"]
    assert report["gaps"] == []


# ----------------------------------------------------------------------------------------------
# Bad input through the command line


def assert_one_line_error(result, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_missing_run(tmp_path: Path):
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nowhere")])
    assert_one_line_error(result, "not found", "nowhere")


def test_cli_rejects_model_override(tiny_trained_run: Path):
    result = CliRunner().invoke(app, ["evaluate", str(tiny_trained_run), "--set", "model.n_layer=3"])
    assert_one_line_error(result, "model.n_layer", "only eval.* and generate.*")


def test_cli_rejects_bad_context_and_split(tiny_trained_run: Path):
    assert_one_line_error(CliRunner().invoke(app, ["evaluate", str(tiny_trained_run), "--context", "0"]), "contexts")
    assert_one_line_error(CliRunner().invoke(app, ["evaluate", str(tiny_trained_run), "--split", "test"]), "eval.split", "test")


def test_empty_split_is_an_error(tiny_trained_run: Path, small_data: Path, tmp_path: Path):
    import datasets

    # The same units, all moved to the training split.
    units = datasets.load_from_disk(str(small_data / "units")).map(lambda row: {"split": "train"})
    units.save_to_disk(str(tmp_path / "data" / "units"))
    shutil.copy(small_data / "manifest.json", tmp_path / "data" / "manifest.json")

    with pytest.raises(UserError, match="the validation split has no tokens"):
        evaluate(tiny_trained_run, data=tmp_path / "data")
