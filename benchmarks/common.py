"""Timing, profiling and bookkeeping shared by the model benchmarks.

Every figure is a median over repeats after warm-up calls, with the interquartile range beside it,
so one slow call on a shared machine does not decide a comparison.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Timing:
    """Seconds per call: median and the 25th and 75th percentiles over `repeats` calls."""

    median: float
    q1: float
    q3: float
    repeats: int

    def scaled(self, factor: float) -> Timing:
        return Timing(self.median * factor, self.q1 * factor, self.q3 * factor, self.repeats)

    def format_ms(self) -> str:
        return f"{format_number(self.median * 1e3)} ({format_number(self.q1 * 1e3)} to {format_number(self.q3 * 1e3)})"

    def format_us(self) -> str:
        return f"{format_number(self.median * 1e6)} ({format_number(self.q1 * 1e6)} to {format_number(self.q3 * 1e6)})"


def format_number(value: float) -> str:
    """Format with three significant digits but without exponents: 1234, 123, 12.3, 1.23, 0.123."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Time `fn` with `time.perf_counter`: `warmup` untimed calls, then `repeats` timed ones."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return timing_of(seconds)


def measure_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several functions in turns (a, b, c, a, b, c, ...), so drift in machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: timing_of(values) for name, values in seconds.items()}


def timing_of(seconds: list[float]) -> Timing:
    if len(seconds) == 1:
        return Timing(seconds[0], seconds[0], seconds[0], 1)
    q1, median, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return Timing(median, q1, q3, len(seconds))


def tensor_nbytes(obj: Any) -> int:
    """Sum the bytes of every tensor inside a (nested) decoding state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_nbytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_nbytes(value) for value in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if hasattr(obj, "__dict__"):
        return sum(tensor_nbytes(value) for value in vars(obj).values())
    return 0


def profile_table(fn: Callable[[], Any], rows: int = 10) -> str:
    """Run `fn` once under `torch.profiler` and return the top `rows` operators by CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


@dataclass
class Target:
    """One target of the benchmark issue and the figure this run reached."""

    name: str
    goal: str
    reached: str
    passed: bool
    profile: str | None = None  # torch.profiler table (or other text) that explains a miss
    profile_caption: str = "`torch.profiler` operators of one call of the case that missed, top 10 by self CPU time:"


@dataclass
class Section:
    """The result of one benchmark: a markdown table, notes, plots and targets."""

    key: str
    title: str
    description: str
    table: str
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def git_revision() -> str:
    """Return the checked-out commit, with "+ local changes" when the working tree differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} + local changes" if dirty.strip() else commit


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
