"""Run directories and crash-safe checkpoints, without pickle.

A run directory looks like this:

    RUN_DIR/config.yaml            effective config of the run
    RUN_DIR/run.json               data and tokenizer directories and their hashes
    RUN_DIR/metrics.jsonl          one JSON record per step and per validation
    RUN_DIR/checkpoints/step-00000100/
        model.safetensors          weights (tied weights stored once)
        optimizer.safetensors      AdamW moments and step counts, keyed "state.<param index>.<name>"
        state.json                 step, RNG states, optimizer param groups, data position,
                                   curriculum state, config, tokenizer hash
        manifest.json              size and sha256 of each file above, written last
    RUN_DIR/checkpoints/best/      the same files for the lowest validation loss

Each checkpoint is written into a hidden temporary directory, flushed to disk and renamed into
place, so a crash leaves either no directory or a complete one. A directory without a manifest
that matches its files is never loaded: `find_checkpoints` reports it as partial.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from spikewalze_cli.config import Config, validate_config
from spikewalze_cli.errors import UserError
from spikewalze_cli.io import atomic_write_json, fsync_directory, read_json, sha256_file

if TYPE_CHECKING:
    from spikewalze_cli.tokenizer import TokenStore

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
BEST = "best"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
RUN_FILE = "run.json"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)
STEP_PATTERN = re.compile(r"^step-(\d{8})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# --------------------------------------------------------------------------- optimizer state


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors-ready tensors and JSON-ready rest.

    Tensors are keyed "state.<param index>.<name>" (for AdamW: exp_avg, exp_avg_sq, step).
    """
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return tensors, json.loads(json.dumps(meta))


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the state dict that `optimizer_to_tensors` split, for `optimizer.load_state_dict`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------- writing


def save_checkpoint(
    run_dir: Path,
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write a complete checkpoint to RUN_DIR/checkpoints/<name> atomically and return its path.

    An existing checkpoint of the same name (`best`, or a step written again after a resume) is
    replaced only after the new one is complete on disk.
    """
    root = run_dir / CHECKPOINTS
    target = root / name
    temp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir()

        save_model(model, str(temp / MODEL_FILE))
        _test_write_delay()
        optimizer_tensors, optimizer_meta = optimizer_to_tensors(optimizer)
        save_file(optimizer_tensors, str(temp / OPTIMIZER_FILE))
        (temp / STATE_FILE).write_text(json.dumps({**state, "optimizer": optimizer_meta}, indent=1) + "\n")
        for file in CHECKPOINT_FILES:
            _fsync_file(temp / file)

        manifest = {
            "step": state["step"],
            "files": {file: {"bytes": (temp / file).stat().st_size, "sha256": sha256_file(temp / file)} for file in CHECKPOINT_FILES},
        }
        atomic_write_json(temp / MANIFEST_FILE, manifest)
        fsync_directory(temp)

        # Swap in the new directory: the old one (if any) is moved aside first and deleted last,
        # so at every moment a complete checkpoint of this name exists under one of the two names.
        old = root / f".old-{name}-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(temp, target)
        fsync_directory(root)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as SafetensorError
        shutil.rmtree(temp, ignore_errors=True)
        detail = getattr(error, "strerror", None) or error
        raise UserError(f"failed to write checkpoint {target}: {detail}; check free space and permissions") from error
    except UserError:  # atomic_write_json reports its own OSError as UserError
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


# Test hook: seconds to sleep after the weights of a checkpoint are written, so fault injection
# tests can kill the process in the middle of a checkpoint write. Unset in normal use.
WRITE_DELAY_ENV = "SPIKEWALZE_TEST_CHECKPOINT_WRITE_DELAY"


def _test_write_delay() -> None:
    delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete step checkpoints (never `best`)."""
    complete, _ = find_checkpoints(run_dir)
    for old in complete[:-keep]:
        # Rename before deleting: a kill in the middle of rmtree then leaves a hidden directory
        # that is reported as partial, not a step directory whose manifest outlives its files.
        doomed = old.with_name(f".old-{old.name}-{os.getpid()}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------------- finding and verifying


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check that every file matches the manifest; return the manifest or raise UserError."""
    manifest_path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise UserError(f"checkpoint not found: {directory}")
    if not manifest_path.is_file():
        raise UserError(f"checkpoint {directory} is incomplete (no {MANIFEST_FILE}); it was interrupted while saving, use an older one")
    manifest = read_json(manifest_path, "checkpoint manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or set(files) != set(CHECKPOINT_FILES):
        raise UserError(f"checkpoint manifest {manifest_path} is invalid: it must list {', '.join(CHECKPOINT_FILES)}")
    for file, expected in files.items():
        path = directory / file
        if not path.is_file():
            raise UserError(f"checkpoint {directory} is corrupt: {file} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise UserError(
                f"checkpoint {directory} is corrupt: {file} has {path.stat().st_size} bytes, the manifest expects {expected['bytes']}"
            )
        if sha256_file(path) != expected["sha256"]:
            raise UserError(f"checkpoint {directory} is corrupt: the sha256 of {file} does not match its manifest")
    return manifest


def find_checkpoints(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """Return (step checkpoints with a manifest, oldest first; directories without one)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return [], []
    complete, partial = [], []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        if child.name.startswith((".tmp-", ".old-")) or (STEP_PATTERN.match(child.name) and not (child / MANIFEST_FILE).is_file()):
            partial.append(child)
        elif STEP_PATTERN.match(child.name):
            complete.append(child)
    return complete, partial


def latest_checkpoint(run_dir: Path) -> Path:
    """Return the newest checkpoint whose files match its manifest, logging the ones skipped."""
    complete, partial = find_checkpoints(run_dir)
    for directory in partial:
        log.warning("skipping partial checkpoint %s (interrupted while saving; safe to delete)", directory)
    for directory in reversed(complete):
        try:
            verify_checkpoint(directory)
        except UserError as error:
            log.warning("skipping %s", error)
            continue
        return directory
    if not (run_dir / RUN_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {RUN_FILE}); pass the --out directory of `spikewalze train`")
    # `train` rejects a directory that contains run.json, so the advice must include deleting it.
    raise UserError(
        f"no complete checkpoint in {run_dir / CHECKPOINTS}, so the run stopped before its first one; "
        f"delete {run_dir} and start the run again with `spikewalze train`"
    )


# --------------------------------------------------------------------------- reading


def read_state(directory: Path) -> dict[str, Any]:
    return read_json(directory / STATE_FILE, "checkpoint state")


def load_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load model.safetensors into `model`, raising UserError when the shapes do not match."""
    try:
        missing, unexpected = load_model(model, str(directory / MODEL_FILE), strict=False)
    except (SafetensorError, RuntimeError) as error:
        raise UserError(f"cannot load weights from {directory / MODEL_FILE}: {str(error).splitlines()[0]}") from None
    if missing or unexpected:
        raise UserError(
            f"weights in {directory / MODEL_FILE} do not match the model (missing: {sorted(missing)[:3]}, "
            f"unexpected: {sorted(unexpected)[:3]}); the config's model section differs from the one trained"
        )


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, state: dict[str, Any]) -> None:
    try:
        tensors = load_file(str(directory / OPTIMIZER_FILE))
        optimizer.load_state_dict(optimizer_from_tensors(tensors, state["optimizer"]))
    except (SafetensorError, KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"cannot load optimizer state from {directory}: {error}") from None


def read_run(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / RUN_FILE, "run description (run.json)")


@dataclass
class LoadedRun:
    """A trained model ready for inference, with everything needed to feed it."""

    model: torch.nn.Module
    config: Config
    run_dir: Path | None
    checkpoint_dir: Path
    tokens: TokenStore
    step: int


def resolve_checkpoint(target: Path) -> Path:
    """Return the checkpoint directory for a run directory (newest complete) or a checkpoint directory."""
    target = Path(target)
    if not target.exists():
        raise UserError(f"run or checkpoint directory not found: {target}")
    if (target / CHECKPOINTS).is_dir() or (target / RUN_FILE).is_file():
        return latest_checkpoint(target)
    if (target / STATE_FILE).is_file() or (target / MANIFEST_FILE).is_file() or (target / MODEL_FILE).is_file():
        return target
    raise UserError(f"{target} is neither a run directory (with {RUN_FILE}) nor a checkpoint directory (with {MANIFEST_FILE})")


def load_for_inference(target: Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Load the model of a run directory (newest complete checkpoint) or of one checkpoint directory.

    The checkpoint is verified against its manifest first, and the tokenizer on disk must be the one
    the model was trained with. The model is returned in eval mode on `device`.
    """
    from spikewalze_cli.model import build_model
    from spikewalze_cli.tokenizer import TokenStore

    checkpoint_dir = resolve_checkpoint(Path(target))
    verify_checkpoint(checkpoint_dir)
    state = read_state(checkpoint_dir)
    try:
        config = validate_config(state["config"], f"{checkpoint_dir / STATE_FILE}")
        tokenizer_dir = Path(state["tokenizer_dir"])
        tokenizer_sha256 = state["tokenizer_sha256"]
        step = int(state["step"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"checkpoint state {checkpoint_dir / STATE_FILE} is invalid ({error}); use another checkpoint") from None

    tokens = TokenStore(tokenizer_dir)
    if tokens.manifest.get("tokenizer_sha256") != tokenizer_sha256:
        raise UserError(
            f"the tokenizer in {tokenizer_dir} is not the one this model was trained with (sha256 differs); "
            "restore that tokenizer directory or train again"
        )

    model = build_model(config.model, tokens.vocab_size)
    load_weights(model, checkpoint_dir)
    model.to(device).eval()

    run_dir = checkpoint_dir.parent.parent if checkpoint_dir.parent.name == CHECKPOINTS else None
    if run_dir is not None and not (run_dir / RUN_FILE).is_file():
        run_dir = None
    return LoadedRun(model=model, config=config, run_dir=run_dir, checkpoint_dir=checkpoint_dir, tokens=tokens, step=step)
