"""The live view of training: a rich progress bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from spikewalze_cli.console import console

log = logging.getLogger(__name__)


class Display:
    """A rich progress bar on a terminal; periodic log lines elsewhere (files, CI, rank > 0 is silent)."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")
        self.last: dict[str, Any] = {}

    def __enter__(self) -> Display:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self.progress.stop()

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if "tokens_per_s" in record:
            self.last = record
        stats = format_stats(record, self.last)
        self.progress.update(self.task, completed=record["step"], stats=stats)
        if not self.live and "tokens_per_s" in record:
            log.info("step %d  %s", record["step"], stats)

    def validation(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        per_stage = "  ".join(f"{stage} {values['loss']:.3f}" for stage, values in record["stages"].items())
        spike = ""
        if record.get("spike_rate") is not None:
            spike = f"  spike rate {record['spike_rate']:.3f} (mean gate {record['gate_mean']:.3f})"
        log.info("step %d  validation loss %.4f  bpb %.4f%s  per stage: %s", record["step"], record["loss"], record["bpb"], spike, per_stage)


def format_stats(record: dict[str, Any], timed: dict[str, Any]) -> str:
    parts = ["loss " + ("non-finite" if record["loss"] is None else f"{record['loss']:.4f}")]
    if "tokens_per_s" in timed:
        parts.append(f"{timed['tokens_per_s']:,.0f} tok/s")
    if timed.get("mfu") is not None:
        parts.append(f"MFU {100 * timed['mfu']:.1f}%")
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("spike_rate") is not None:
        parts.append(f"spike {record['spike_rate']:.3f}")
    parts.append("mix " + " ".join(f"{stage}{100 * share:.0f}" for stage, share in record["stage_mix"].items()))
    return "  ".join(parts)
