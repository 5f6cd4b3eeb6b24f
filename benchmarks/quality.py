"""Quality benchmarks on the shared German Wikipedia: equal-time training, curricula, spikes per stage.

These drive the real command line (`python -m spikewalze_cli ...`) in subprocesses, exactly as a
user would run it: prepare-data and build-tokenizer once (cached under the work directory, reused
while their manifest exists), then one training run per variant and `evaluate --json` on each.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import speed
from benchmarks.common import Section, Target, markdown_table, measure
from benchmarks.plots import plot_bars, plot_lines
from spikewalze_cli.config import load_config

logger = logging.getLogger(__name__)


@dataclass
class Corpus:
    """A prepared data directory and the tokenizer built on it."""

    data_dir: Path
    tokenizer_dir: Path
    seconds: float


def run_cli(args: list[str], log_path: Path, stop_after_s: float | None = None) -> float:
    """Run one `spikewalze` command, its output going to `log_path`; return its wall-clock seconds.

    With `stop_after_s`, the command gets SIGTERM once that many seconds have passed. `train` then
    finishes its current step, saves a checkpoint and exits with code 130, which counts as success.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "spikewalze_cli", *args]
    logger.info("running spikewalze %s", " ".join(args))
    start = time.perf_counter()
    stopped = False
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=stop_after_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            stopped = True
            process.wait()
    seconds = time.perf_counter() - start
    if stopped and process.returncode == -signal.SIGTERM:
        raise RuntimeError(f"`spikewalze {args[0]}` was still starting after {stop_after_s:.0f} s and ended without a checkpoint; raise the budget")
    if process.returncode != 0 and not (stopped and process.returncode == 130):
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"`spikewalze {' '.join(args)}` failed with exit code {process.returncode}; log {log_path}:\n{tail}")
    return seconds


def prepare_corpus(work_dir: Path, config: Path, parquet: Path, max_articles: int | None, vocab_size: int) -> Corpus:
    """Prepare the data and build the tokenizer unless a complete copy with these settings exists."""
    suffix = f"-{max_articles}" if max_articles else ""
    data_dir = work_dir / f"data{suffix}"
    tokenizer_dir = work_dir / f"tokenizer{suffix}-{vocab_size}"
    seconds = 0.0
    if not (data_dir / "manifest.json").is_file():
        args = ["prepare-data", "--config", str(config), "--input", str(parquet), "--out", str(data_dir)]
        if max_articles:
            args += ["--max-articles", str(max_articles)]
        seconds += run_cli(args, work_dir / "logs" / "prepare-data.log")
    if not (tokenizer_dir / "manifest.json").is_file():
        args = ["build-tokenizer", "--config", str(config), "--data", str(data_dir), "--out", str(tokenizer_dir)]
        args += ["--set", f"tokenizer.vocab_size={vocab_size}"]
        seconds += run_cli(args, work_dir / "logs" / "build-tokenizer.log")
    return Corpus(data_dir, tokenizer_dir, seconds)


def variant_overrides(variant: str) -> list[str]:
    if variant == "gpt":
        return ["model.arch=gpt"]
    return ["model.arch=spikewalze", f"model.spike.mode={variant}"]


def train_run(
    corpus: Corpus, config: Path, run_dir: Path, overrides: list[str], log_name: str, stop_after_s: float | None = None
) -> float:
    """Train a fresh run into `run_dir` (an older one there is removed); return the seconds taken."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    args = ["train", "--config", str(config), "--data", str(corpus.data_dir), "--tokenizer", str(corpus.tokenizer_dir)]
    args += ["--out", str(run_dir)]
    for override in overrides:
        args += ["--set", override]
    return run_cli(args, run_dir.parent / "logs" / f"{log_name}.log", stop_after_s)


def evaluate_run(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    json_path = run_dir / "bench-eval.json"
    args = ["evaluate", str(run_dir), "--json", str(json_path)]
    for override in overrides:
        args += ["--set", override]
    run_cli(args, run_dir.parent / "logs" / f"evaluate-{run_dir.name}.log")
    return json.loads(json_path.read_text(encoding="utf-8"))


def result_for_mode(report: Any, gate_mode: str) -> dict[str, Any]:
    """Find the evaluation figures of one gate mode in `evaluate --json` output."""
    candidates: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "bits_per_byte" in node:
                candidates.append(node)
            for key, value in node.items():
                if key != "per_stage":
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(report)
    for candidate in candidates:
        if candidate.get("gate_mode") == gate_mode:
            return candidate
    if candidates:
        return candidates[0]
    raise RuntimeError(f"no bits_per_byte in the evaluate output: {json.dumps(report)[:500]}")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def validation_curve(records: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Return (steps, validation bits per byte) from the validation records of metrics.jsonl."""
    steps, values = [], []
    for record in records:
        kind = str(record.get("kind", record.get("type", record.get("split", ""))))
        value = record.get("val_bits_per_byte", record.get("val_bpb"))
        if value is None and kind.startswith("val"):
            value = record.get("bits_per_byte", record.get("bpb"))
        if value is not None and "step" in record:
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def last_step(records: list[dict[str, Any]]) -> int:
    return max((int(r["step"]) for r in records if "step" in r), default=0)


# ----------------------------------------------------------------------------------------------
# d. Quality at equal wall-clock budget, and g. spike rate per stage


def estimate_step_seconds(config: Path, overrides: list[str], vocab_size: int, repeats: int = 3) -> float:
    """Time the optimizer step of a config in this process: one batch of train.batch_tokens tokens."""
    cfg = load_config(config, overrides)
    batch_size = max(1, cfg.train.batch_tokens // cfg.model.context)
    step = speed.make_train_step(cfg.model, vocab_size, batch_size, cfg.model.context)
    return measure(step, repeats=repeats, warmup=1).median


def bench_quality(
    corpus: Corpus,
    config: Path,
    work_dir: Path,
    budget_s: float,
    extra_overrides: list[str],
    eval_overrides: list[str],
    img_dir: Path,
) -> tuple[Section, Section]:
    """Train learned/always/never/gpt for the same wall-clock budget; evaluate each on validation.

    Each run gets max_steps from a timing of its optimizer step in this process and is stopped
    with SIGTERM when the budget is spent, so all runs train for the same wall-clock time.
    """
    variants = ("learned", "always", "never", "gpt")
    vocab_size = int(json.loads((corpus.tokenizer_dir / "manifest.json").read_text(encoding="utf-8"))["vocab_size"])
    peak, _ = speed.measure_matmul_peak([512, 1024], repeats=3)
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        overrides = [*extra_overrides, *variant_overrides(variant)]
        step_s = estimate_step_seconds(config, overrides, vocab_size)
        # Plan 1.5x the steps the estimate allows, so every run is stopped by the time limit, not by
        # max_steps, even when the machine gets faster during the run. NOTE: the cosine decay then
        # ends about two thirds of the way, the same for every model.
        steps = max(1, int(1.5 * budget_s / step_s))
        overrides += [
            f"train.max_steps={steps}",
            f"train.warmup_steps={max(1, steps // 10)}",  # the config's warm-up can exceed a short budget's steps
            f"train.eval_interval={steps}",
            f"train.checkpoint_interval={steps}",
            f"train.peak_flops={peak:.4g}",  # skips the trainer's own peak measurement, which only its display uses
        ]
        run_dir = work_dir / f"quality-{variant}"
        seconds = train_run(corpus, config, run_dir, overrides, f"train-quality-{variant}", stop_after_s=budget_s)
        report = evaluate_run(run_dir, eval_overrides)
        hard = result_for_mode(report, "hard")
        soft = result_for_mode(report, "soft")
        results[variant] = {
            "train_s": seconds,
            "planned_steps": steps,
            "steps": int(report.get("step", last_step(read_metrics(run_dir)))),
            "bpb_hard": float(hard["bits_per_byte"]),
            "bpb_soft": float(soft["bits_per_byte"]),
            "flops": float(hard["flops_per_token"]),
            "flops_dense": float(hard.get("flops_per_token_dense") or hard["flops_per_token"]),
            "spike_rate": hard.get("spike_rate"),
            "per_stage": hard.get("per_stage"),
            "unigram_bpb": read_run_info(run_dir).get("unigram_validation_bpb"),
        }
        logger.info("quality %s: %s", variant, {k: v for k, v in results[variant].items() if k != "per_stage"})

    rows = []
    for variant, r in results.items():
        spike = "" if r["spike_rate"] is None or variant == "gpt" else f"{float(r['spike_rate']):.3f}"
        rows.append(
            [variant, f"{r['steps']} of {r['planned_steps']}", f"{r['train_s']:.0f}", f"{r['bpb_soft']:.4f}", f"{r['bpb_hard']:.4f}", spike, f"{r['flops'] / 1e6:.2f}", f"{r['flops_dense'] / 1e6:.2f}"]
        )
    header = ["model", "steps done of planned", "train s (incl. start-up)", "val bpb soft", "val bpb hard", "spike rate (hard)", "inference MFLOPs/token", "dense MFLOPs/token"]
    table = markdown_table(header, rows)

    plot = "bench-quality.png"
    plot_bars(
        img_dir / plot,
        list(results),
        {"validation bits per byte (hard gate)": [r["bpb_hard"] for r in results.values()]},
        ylabel="bits per byte",
        title=f"Validation bits per byte after {budget_s:.0f} s of training",
    )

    learned, gpt, always = results["learned"], results["gpt"], results["always"]
    bpb_ratio = learned["bpb_hard"] / gpt["bpb_hard"]
    flop_saving = 1 - learned["flops"] / always["flops"]
    targets = [
        Target("d. learned bits per byte vs gpt", "at most 1.02x (within 2%)", f"{bpb_ratio:.3f}x", bpb_ratio <= 1.02),
        Target("d. learned FLOPs per token vs always", "at least 30% fewer", f"{100 * flop_saving:.1f}% fewer", flop_saving >= 0.30),
    ]
    if not targets[1].passed:
        targets[1].profile = flop_breakdown(results)
        targets[1].profile_caption = "Where the FLOPs go (forward FLOPs per token from `spikewalze evaluate`):"
    notes = quality_notes(results)
    quality = Section(
        key="quality",
        title="d. Quality at equal wall-clock budget",
        description=(
            f"Each model trains from scratch with `spikewalze train` for at most {budget_s:.0f} s of wall-clock time, "
            f"start-up included, with the same data, tokenizer and config ({config.name}; overrides "
            f"{' '.join(extra_overrides) or 'none'}). max_steps is 1.5 times the steps that fit the budget at the step "
            "time measured for each model in the benchmark process, with a warm-up of a tenth of them, and every run "
            "gets SIGTERM when the budget is spent, finishes its step and saves. `spikewalze evaluate` then reads "
            "the validation split with the soft and the hard gate (`gpt` has no gate). Inference FLOPs per token are the hard-gate count at the measured spike rate."
        ),
        table=table,
        notes=notes,
        plots=[plot],
        targets=targets,
        data=results,
    )
    return quality, spike_rate_per_stage(results["learned"], img_dir)


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def flop_breakdown(results: dict[str, dict[str, Any]]) -> str:
    """Explain the FLOP saving of the learned gate: the gated share of the dense count bounds it."""
    dense = results["always"]["flops"]
    ungated = results["never"]["flops"]  # everything but the expert
    gated_share = 1 - ungated / dense
    rate = results["learned"].get("spike_rate")
    lines = [
        f"always (expert for every token): {dense / 1e6:.2f} MFLOPs/token",
        f"never (no expert work):          {ungated / 1e6:.2f} MFLOPs/token",
        f"gated share of the dense count:  {100 * gated_share:.1f}%",
        f"learned at spike rate {float(rate or 0):.3f}:     {results['learned']['flops'] / 1e6:.2f} MFLOPs/token",
        "",
        f"Even a spike rate of 0 could save at most {100 * gated_share:.1f}% against always, because the expert is only",
        "that share of the forward FLOPs: the Walze, the ungated feed-forward, the embedding and the output",
        "layer run for every token. The learned gate also computes keys and values for every token in the",
        "window, and its detector adds FLOPs that always and never do not have.",
    ]
    return "\n".join(lines)


def quality_notes(results: dict[str, dict[str, Any]]) -> list[str]:
    notes = []
    unigram = [r["unigram_bpb"] for r in results.values() if r.get("unigram_bpb") is not None]
    if unigram:
        notes.append(
            f"For scale: a unigram model of the training tokens scores {unigram[0]:.4f} bits per byte on the validation "
            "split (`unigram_validation_bpb` in run.json). Models near that figure have learned little more than token "
            "frequencies, so differences between them say little about the architectures."
        )
    return notes


def spike_rate_per_stage(learned: dict[str, Any], img_dir: Path) -> Section:
    """Tabulate validation loss and spike rate per curriculum stage for the learned model."""
    per_stage = learned.get("per_stage") or {}
    if isinstance(per_stage, list):
        per_stage = {str(entry.get("stage")): entry for entry in per_stage}
    stages = sorted(per_stage)

    rows, rates = [], []
    for stage in stages:
        entry = per_stage[stage]
        rate = entry.get("spike_rate")
        rates.append(float(rate) if rate is not None else float("nan"))
        loss = entry.get("loss")
        bpb = entry.get("bits_per_byte")
        rows.append([stage, "" if loss is None else f"{float(loss):.4f}", "" if bpb is None else f"{float(bpb):.4f}", "" if rate is None else f"{float(rate):.3f}"])
    table = markdown_table(["stage (A easiest)", "val loss", "val bpb", "spike rate"], rows)

    plot = "bench-spike-stage.png"
    plot_bars(img_dir / plot, stages, {"spike rate": rates}, ylabel="mean spike rate (hard gate)", title="Learned gate: spike rate per difficulty stage")

    finite = [r for r in rates if r == r]  # drop NaN, the stages without a spike rate
    if len(finite) >= 2:
        verdict = "rises" if finite[-1] > finite[0] else "does not rise"
        note = f"The spike rate {verdict} from stage {stages[0]} ({finite[0]:.3f}) to stage {stages[-1]} ({finite[-1]:.3f})."
    else:
        note = "The evaluation output had no per-stage spike rates."
    return Section(
        key="spike_stage",
        title="g. Spike rate per curriculum stage",
        description="The `learned` model of section d on the validation split, hard gate, split by difficulty stage. " + note,
        table=table,
        plots=[plot],
        data={"per_stage": per_stage},
    )


# ----------------------------------------------------------------------------------------------
# e. Curriculum schedules at equal steps


def bench_curriculum(
    corpus: Corpus, config: Path, work_dir: Path, steps: int, evals: int, extra_overrides: list[str], img_dir: Path
) -> Section:
    """Train the learned model with each schedule for `steps` steps; plot validation bpb over steps."""
    interval = max(1, steps // evals)
    peak, _ = speed.measure_matmul_peak([512, 1024], repeats=3)
    curves: dict[str, tuple[list[int], list[float]]] = {}
    seconds = {}
    for schedule in ("none", "competence", "adaptive"):
        run_dir = work_dir / f"curriculum-{schedule}"
        overrides = [
            *extra_overrides,
            *variant_overrides("learned"),
            f"curriculum.schedule={schedule}",
            f"train.max_steps={steps}",
            f"train.eval_interval={interval}",
            f"train.checkpoint_interval={steps}",
            f"train.peak_flops={peak:.4g}",
        ]
        seconds[schedule] = train_run(corpus, config, run_dir, overrides, f"train-curriculum-{schedule}")
        curves[schedule] = validation_curve(read_metrics(run_dir))

    all_steps = sorted({s for xs, _ in curves.values() for s in xs})
    rows = []
    for step in all_steps:
        row = [step]
        for schedule, (xs, ys) in curves.items():
            row.append(f"{ys[xs.index(step)]:.4f}" if step in xs else "")
        rows.append(row)
    table = markdown_table(["step", *(f"{s} val bpb" for s in curves)], rows)
    plot = "bench-curriculum.png"
    plot_lines(img_dir / plot, curves, xlabel="optimizer step", ylabel="validation bits per byte", title=f"Curriculum schedules, learned gate, {steps} steps")
    finals = {s: ys[-1] for s, (xs, ys) in curves.items() if ys}
    note = ", ".join(f"{s} {v:.4f}" for s, v in finals.items())
    return Section(
        key="curriculum",
        title="e. Curriculum schedules at equal steps",
        description=(
            f"The `learned` Spike-Walze model trained for {steps} optimizer steps with each schedule, same seed, "
            f"data and config, validated every {interval} steps (train.eval_batches batches, from metrics.jsonl). "
            f"Final validation bits per byte: {note}."
        ),
        table=table,
        plots=[plot],
        data={"curves": curves, "train_s": seconds},
    )
