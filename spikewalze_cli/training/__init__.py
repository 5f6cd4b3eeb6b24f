"""`spikewalze train` and `spikewalze resume`: curriculum training with exact, crash-safe checkpoints."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from spikewalze_cli.checkpoint import RUN_FILE, find_checkpoints, latest_checkpoint, read_run, read_state, verify_checkpoint
from spikewalze_cli.config import Config, _set_dotted, config_to_dict, parse_override, validate_config, write_effective_config
from spikewalze_cli.errors import UserError
from spikewalze_cli.io import atomic_write_json, atomic_write_text, read_json, sha256_file
from spikewalze_cli.training.inputs import open_inputs
from spikewalze_cli.training.metrics import METRICS_FILE
from spikewalze_cli.training.runtime import start_runtime
from spikewalze_cli.training.trainer import Trainer

__all__ = ["train", "resume"]

log = logging.getLogger(__name__)


def train(config: Config) -> Path:
    """Start a new run in train.out and train it to train.max_steps; return the run directory."""
    runtime = start_runtime(config.train.device)
    try:
        data_dir = Path(config.train.data or config.tokenizer.data or config.data.out)
        tokenizer_dir = Path(config.train.tokenizer or config.tokenizer.out)
        inputs = open_inputs(data_dir, tokenizer_dir)
        run_dir = Path(config.train.out).resolve()

        complete, partial = find_checkpoints(run_dir)
        if (run_dir / RUN_FILE).exists() or complete or partial:
            raise UserError(
                f"{run_dir} already contains a run; continue it with `spikewalze resume {run_dir}` or pass another --out"
            )
        trainer = Trainer(config, run_dir, inputs, runtime)
        if runtime.is_main:
            write_effective_config(config, run_dir)
            created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            atomic_write_json(run_dir / RUN_FILE, {**inputs.describe(), "unigram_validation_bpb": trainer.unigram_bpb, "created": created})
            atomic_write_text(run_dir / METRICS_FILE, "")
        runtime.barrier()
        return trainer.fit()
    finally:
        runtime.close()


def resume(run_dir: Path, checkpoint: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Continue a run from its newest complete checkpoint (or `checkpoint`) to train.max_steps.

    Overrides apply on top of the checkpoint's config. A change to the model section, or a
    tokenizer or dataset that differs from the one the run started with, raises UserError.
    """
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    run = read_run(run_dir)
    if checkpoint is None:
        checkpoint_dir = latest_checkpoint(run_dir)
    else:
        checkpoint_dir = Path(checkpoint).resolve()
        verify_checkpoint(checkpoint_dir)
    state = read_state(checkpoint_dir)
    saved = validate_config(state["config"], str(checkpoint_dir / "state.json"))

    tree = copy.deepcopy(config_to_dict(saved))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = validate_config(tree, "--set")
    _reject_model_change(saved, config)

    data_dir = Path(config.train.data) if config.train.data != saved.train.data else Path(run["data_dir"])
    tokenizer_dir = Path(config.train.tokenizer) if config.train.tokenizer != saved.train.tokenizer else Path(run["tokenizer_dir"])
    _reject_input_change(data_dir, tokenizer_dir, state)

    runtime = start_runtime(config.train.device)
    try:
        inputs = open_inputs(data_dir, tokenizer_dir)
        trainer = Trainer(config, run_dir, inputs, runtime)
        trainer.load(checkpoint_dir, state)
        if runtime.is_main:
            log.info("resuming %s from %s (step %d)", run_dir, checkpoint_dir.relative_to(run_dir) if checkpoint_dir.is_relative_to(run_dir) else checkpoint_dir, trainer.step)
            write_effective_config(config, run_dir)
        runtime.barrier()
        return trainer.fit()
    finally:
        runtime.close()


def _reject_model_change(saved: Config, config: Config) -> None:
    before, after = saved.model.model_dump(), config.model.model_dump()
    changed = [f"model.{key} ({before[key]!r} -> {after[key]!r})" for key in before if before[key] != after[key]]
    if changed:
        raise UserError(
            f"cannot resume with a changed model: {', '.join(changed)}; start a new run with `spikewalze train` instead"
        )


def _reject_input_change(data_dir: Path, tokenizer_dir: Path, state: dict) -> None:
    data_manifest = data_dir / "manifest.json"
    if data_manifest.is_file() and sha256_file(data_manifest) != state["data_manifest_sha256"]:
        raise UserError(
            f"cannot resume: the dataset in {data_dir} changed since the run started (its manifest.json differs); "
            f"restore the original prepared data or start a new run"
        )
    tokenizer_manifest = tokenizer_dir / "manifest.json"
    if tokenizer_manifest.is_file():
        sha = read_json(tokenizer_manifest, "tokenizer manifest").get("tokenizer_sha256")
        if sha != state["tokenizer_sha256"]:
            raise UserError(
                f"cannot resume: the tokenizer in {tokenizer_dir} changed since the run started (tokenizer_sha256 differs); "
                f"restore the original tokenizer or start a new run"
            )

