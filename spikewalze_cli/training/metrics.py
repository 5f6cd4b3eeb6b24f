"""Metrics of a run: JSON lines, optional TensorBoard, the peak FLOP/s for MFU and the curve plot."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spikewalze_cli.errors import UserError
from spikewalze_cli.io import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


def bits_per_byte(loss_nats: float, tokens: float, num_bytes: float) -> float:
    """Convert a mean loss in nats per token to bits per UTF-8 byte of the text."""
    return loss_nats * tokens / (num_bytes * math.log(2)) if num_bytes > 0 else float("nan")


def unigram_bits_per_byte(tokens: Any) -> float:
    """Return the validation bits per byte of a unigram model of the training tokens.

    Token frequencies are counted over every training stage with add-one smoothing, then applied
    to every validation token. This is the floor any language model should beat.
    """
    counts = np.ones(tokens.vocab_size, dtype=np.float64)
    for stage in tokens.stages:
        counts += np.bincount(np.asarray(tokens.tokens("train", stage)), minlength=tokens.vocab_size)[: tokens.vocab_size]
    log_probability = np.log(counts / counts.sum())

    nats, num_bytes = 0.0, 0
    for stage in tokens.stages:
        ids = np.asarray(tokens.tokens("validation", stage))
        nats -= float(log_probability[ids].sum())
        num_bytes += int(tokens.units("validation", stage)["bytes"].sum())
    return nats / (num_bytes * math.log(2)) if num_bytes else float("nan")


class MetricsLog:
    """Appends one JSON record per line to RUN_DIR/metrics.jsonl, and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / METRICS_FILE
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard is true but TensorBoard is not installed; pip install 'spikewalze[tensorboard]'") from None
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        record = _finite_or_none(record)
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as error:
            raise UserError(
                f"failed to append to {self.path}: {error.strerror or error}; free space or fix permissions, "
                "then resume from the last checkpoint"
            ) from error
        if self.writer is not None:
            prefix = record["kind"]
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "kind"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step`, which a resume from that step will write again."""
        if not self.path.is_file():
            return
        kept = [line for line in read_records(self.path) if line["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _finite_or_none(value: Any) -> Any:
    """Replace NaN and infinities (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, list):
            flat.update({f"{prefix}{key}/{index}": item for index, item in enumerate(value)})
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl, skipping a last line cut short by a crash."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a damaged line in %s", path)
    return records


# --------------------------------------------------------------------------- peak FLOP/s for MFU


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measure dense matmul FLOP/s on `device` once, cached in ~/.cache/spikewalze/peak_flops.json.

    NOTE: this is the throughput of a 2048x2048 matrix product with the current thread count, a
    practical peak rather than the vendor's datasheet figure, so MFU reads higher than against
    the datasheet.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spikewalze" / "peak_flops.json"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}cores"
    key = f"{name}|{dtype}|threads={torch.get_num_threads()}"
    try:
        cached = read_json(cache, "peak FLOP/s cache") if cache.is_file() else {}
    except UserError:
        cached = {}
    if key in cached:
        return float(cached[key])

    size = 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    log.info("measured peak %.3g FLOP/s (%s, %s); cached in %s", best, name, dtype, cache)
    try:
        atomic_write_json(cache, {**cached, key: best})
    except UserError as error:
        log.warning("could not cache the peak FLOP/s: %s", error)
    return best


# --------------------------------------------------------------------------- the curve plot


def plot_run(run_dir: Path) -> Path:
    """Draw training loss and spike rate over steps, and validation loss and spike rate per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(run_dir / METRICS_FILE)
    train = [r for r in records if r["kind"] == "train" and math.isfinite(r.get("loss", math.nan))]
    valid = [r for r in records if r["kind"] == "validation"]

    figure, ((loss_axis, rate_axis), (stage_loss_axis, stage_rate_axis)) = plt.subplots(2, 2, figsize=(12, 8))
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train")
    if valid:
        loss_axis.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="validation")
    loss_axis.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    loss_axis.legend()

    rates = [(r["step"], r["spike_rate"]) for r in train if r.get("spike_rate") is not None]
    if rates:
        rate_axis.plot(*zip(*rates), lw=0.8, label="train (mean gate)")
    target = next((r["target_rate"] for r in records if r.get("target_rate") is not None), None)
    if target is not None:
        rate_axis.axhline(target, color="gray", ls="--", label="target")
    rate_axis.set(title="Spike rate", xlabel="step", ylabel="share of tokens", ylim=(0, 1))
    rate_axis.legend()

    stages = sorted({stage for r in valid for stage in r.get("stages", {})})
    for stage in stages:
        points = [(r["step"], r["stages"][stage]) for r in valid if stage in r.get("stages", {})]
        stage_loss_axis.plot([p[0] for p in points], [p[1]["loss"] for p in points], "o-", label=f"stage {stage}")
        spikes = [(step, item["spike_rate"]) for step, item in points if item.get("spike_rate") is not None]
        if spikes:
            stage_rate_axis.plot(*zip(*spikes), "o-", label=f"stage {stage}")
    stage_loss_axis.set(title="Validation loss per stage", xlabel="step", ylabel="nats/token")
    stage_rate_axis.set(title="Validation spike rate per stage", xlabel="step", ylabel="share of tokens", ylim=(0, 1))
    for axis in (stage_loss_axis, stage_rate_axis):
        if stages:
            axis.legend()

    figure.tight_layout()
    target_path = run_dir / PLOT_FILE
    figure.savefig(target_path, dpi=110)
    plt.close(figure)
    return target_path
