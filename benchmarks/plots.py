"""PNG line and bar plots for the benchmark page (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

Series = dict[str, tuple[list[float], list[float]]]


def plot_lines(
    path: Path,
    series: Series,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    second: Series | None = None,
    second_ylabel: str = "",
) -> None:
    """Write one line per series; `second` adds a right-hand panel with its own y axis label."""
    columns = 2 if second else 1
    figure, axes = plt.subplots(1, columns, figsize=(6.5 * columns, 4.2), squeeze=False)
    panels = [(axes[0][0], series, ylabel)]
    if second:
        panels.append((axes[0][1], second, second_ylabel))
    for axis, lines, label in panels:
        for name, (xs, ys) in lines.items():
            axis.plot(xs, ys, marker="o", label=name)
        if logx:
            axis.set_xscale("log", base=2)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_bars(path: Path, groups: list[str], bars: dict[str, list[float]], *, ylabel: str, title: str) -> None:
    """Write grouped bars: one group per entry of `groups`, one bar per key of `bars`."""
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    width = 0.8 / max(1, len(bars))
    for i, (name, values) in enumerate(bars.items()):
        positions = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, values, width=width, label=name)
    axis.set_xticks(range(len(groups)), groups)
    axis.set_ylabel(ylabel)
    axis.grid(True, axis="y", alpha=0.3)
    if len(bars) > 1:
        axis.legend(fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
