"""`make bench`: Spike-Walze against the `gpt` baseline, side by side, written to docs/benchmarks.md.

    python -m benchmarks.model_bench [--quick] [--quality-budget-s N] [--out docs] [--only a,b,...]

Sections: a. training step cost against sequence length, b. generation time and state per token,
c. the hard gate against forced spike rates, d. quality at an equal wall-clock budget, e. curriculum
schedules at equal steps, f. training MFU, g. spike rate per curriculum stage (from d's learned
model), h. our `gpt` against transformers' GPT2LMHeadModel. The default settings are sized for
about 45 minutes on 2 idle CPU cores from a fresh clone, prepare-data and build-tokenizer
included. `--quick` shrinks every size for a run of a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import quality, speed
from benchmarks.common import Section, Target, git_revision, load_average, machine_info
from benchmarks.report import now, write_page
from spikewalze_cli.config import ModelConfig, load_config

logger = logging.getLogger("benchmarks.model_bench")

REPO = Path(__file__).resolve().parents[1]
SHARED_PARQUET = REPO.parent / "shared" / "data" / "dewiki-articles.parquet"
ALL_SECTIONS = "abcdefgh"


@dataclass
class Settings:
    """Sizes of every benchmark; `full()` is `make bench`, `quick()` is `make bench-quick`."""

    mode: str
    speed_config: Path  # model of sections a, b, c
    mfu_config: Path  # model of sections f and h
    model_overrides: dict = field(default_factory=dict)  # applied to both model configs (tests shrink them)
    vocab_size: int | None = None  # null: tokenizer.vocab_size of speed_config
    train_seq_lens: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384])
    train_batch_tokens: int = 16384
    train_repeats: int = 3
    gen_positions: list[int] = field(default_factory=lambda: [128, 512, 2048, 8192])
    gen_timed_steps: int = 16
    gate_batch: int = 4
    gate_seq_len: int = 1024
    gate_rates: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    gate_repeats: int = 7
    mfu_batch: int = 4
    mfu_seq_len: int | None = None  # null: the mfu_config context
    matmul_sizes: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    mfu_repeats: int = 3
    quality_config: Path = REPO / "configs" / "tiny.yaml"
    quality_max_articles: int | None = None
    quality_vocab_size: int | None = None  # null: tokenizer.vocab_size of quality_config
    quality_budget_s: float = 120.0
    quality_overrides: list[str] = field(default_factory=lambda: ["train.batch_tokens=4096", "train.eval_batches=4"])
    eval_overrides: list[str] = field(default_factory=lambda: ["eval.max_batches=5"])
    curriculum_steps: int = 30
    curriculum_evals: int = 3
    curriculum_overrides: list[str] = field(default_factory=lambda: ["train.batch_tokens=4096", "train.eval_batches=4"])

    @classmethod
    def full(cls) -> Settings:
        return cls(mode="full", speed_config=REPO / "configs" / "tiny.yaml", mfu_config=REPO / "configs" / "small.yaml")

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            mode="quick",
            speed_config=REPO / "configs" / "tiny.yaml",
            mfu_config=REPO / "configs" / "tiny.yaml",
            train_seq_lens=[256, 1024, 4096],
            train_batch_tokens=4096,
            train_repeats=3,
            gen_positions=[128, 512, 2048],
            gen_timed_steps=8,
            gate_batch=2,
            gate_seq_len=512,
            gate_repeats=3,
            mfu_batch=4,
            matmul_sizes=[256, 512, 1024],
            quality_max_articles=300,
            quality_budget_s=30.0,
            quality_overrides=["train.batch_tokens=4096", "train.eval_batches=2", "train.log_interval=5"],
            eval_overrides=["eval.max_batches=2"],
            curriculum_steps=12,
            curriculum_evals=3,
        )


def model_config(path: Path, overrides: dict) -> tuple[ModelConfig, int]:
    config = load_config(path)
    data = config.model.model_dump()
    data.update(overrides)
    return ModelConfig.model_validate(data), config.tokenizer.vocab_size


# Run order: the quality runs (d, with g) first, then the speed sections; the page keeps a..h order.
RUN_ORDER = "dbcafhe"


def run_sections(settings: Settings, only: str, out_dir: Path, work_dir: Path, on_section: Callable[[dict[str, Section]], None]) -> dict[str, Section]:
    """Run the chosen sections in RUN_ORDER; call `on_section` with all results after each one."""
    img_dir = out_dir / "img"
    speed_model, speed_vocab = model_config(settings.speed_config, settings.model_overrides)
    mfu_model, mfu_vocab = model_config(settings.mfu_config, settings.model_overrides)
    speed_vocab = settings.vocab_size or speed_vocab
    mfu_vocab = settings.vocab_size or mfu_vocab
    mfu_seq_len = settings.mfu_seq_len or mfu_model.context
    mfu_name = settings.mfu_config.stem
    model_overrides = [f"model.{key}={value}" for key, value in settings.model_overrides.items()]
    corpus: quality.Corpus | None = None

    def get_corpus() -> quality.Corpus:
        nonlocal corpus
        if corpus is None:
            vocab_size = settings.quality_vocab_size or load_config(settings.quality_config).tokenizer.vocab_size
            corpus = quality.prepare_corpus(work_dir, settings.quality_config, SHARED_PARQUET, settings.quality_max_articles, vocab_size)
            logger.info("prepare-data and build-tokenizer: %.0f s", corpus.seconds)
        return corpus

    def quality_and_stages() -> Section:
        quality_section, stage_section = quality.bench_quality(
            get_corpus(),
            settings.quality_config,
            work_dir,
            settings.quality_budget_s,
            [*settings.quality_overrides, *model_overrides],
            settings.eval_overrides,
            img_dir,
        )
        if corpus is not None and corpus.seconds:
            quality_section.notes.append(
                f"prepare-data and build-tokenizer took {corpus.seconds:.0f} s of this section (cached for later runs)."
            )
        sections["g"] = stage_section
        return quality_section

    jobs: dict[str, Callable[[], Section]] = {
        "a": lambda: speed.bench_train_step(speed_model, speed_vocab, settings.train_seq_lens, settings.train_batch_tokens, settings.train_repeats, img_dir),
        "b": lambda: speed.bench_generation(speed_model, speed_vocab, settings.gen_positions, settings.gen_timed_steps, speed_model.spike.target_rate, img_dir),
        "c": lambda: speed.bench_hard_gate(speed_model, speed_vocab, settings.gate_batch, settings.gate_seq_len, settings.gate_rates, settings.gate_repeats, img_dir),
        "d": quality_and_stages,
        "e": lambda: quality.bench_curriculum(
            get_corpus(),
            settings.quality_config,
            work_dir,
            settings.curriculum_steps,
            settings.curriculum_evals,
            [*settings.quality_overrides, *settings.curriculum_overrides, *model_overrides],
            img_dir,
        ),
        "f": lambda: speed.bench_mfu(mfu_model, mfu_name, mfu_vocab, settings.mfu_batch, mfu_seq_len, settings.matmul_sizes, settings.mfu_repeats),
        "h": lambda: speed.bench_hf_baseline(mfu_model, mfu_name, mfu_vocab, settings.mfu_batch, mfu_seq_len, settings.mfu_repeats),
    }
    if "g" in only and "d" not in only:
        only += "d"  # g reads the learned model that d trains
    sections: dict[str, Section] = {}
    for key in RUN_ORDER:
        if key in only and key in jobs:
            logger.info("section %s ...", key)
            start = time.perf_counter()
            try:
                sections[key] = jobs[key]()
            except Exception as error:  # noqa: BLE001 - one failed section must not cost the others
                logger.exception("section %s failed", key)
                sections[key] = failed_section(key, error)
            sections[key].seconds = time.perf_counter() - start
            logger.info("section %s done in %.0f s", key, sections[key].seconds)
            on_section(sections)
    return sections


SECTION_TITLES = {
    "a": "a. Training step cost per token against sequence length",
    "b": "b. Generation: time and state memory per token",
    "c": "c. Hard gate: gated work against the forced spike rate",
    "d": "d. Quality at equal wall-clock budget",
    "e": "e. Curriculum schedules at equal steps",
    "f": "f. Hardware use: training MFU",
    "h": "h. The baseline against Hugging Face transformers",
}


def failed_section(key: str, error: Exception) -> Section:
    message = str(error).strip().replace("\n", " ")[:1500]
    return Section(key=key, title=SECTION_TITLES[key], description=f"**This section failed:** {type(error).__name__}: {message}", table="")


def load_note(before: str) -> str:
    threads = torch.get_num_threads()
    try:
        busy = float(before.split(",")[0]) >= 0.5
    except ValueError:
        busy = False
    if busy:
        return (
            f"Other processes were running when the run started, so the machine was shared and absolute timings are "
            f"noisier than on an idle machine ({threads} torch threads); ratios measured side by side are less affected."
        )
    return f"The machine was idle when the run started ({threads} torch threads)."


def run_benchmarks(
    settings: Settings, only: str, out_dir: Path, work_dir: Path, command: str, page: str = "benchmarks.md"
) -> list[Section]:
    """Run the chosen sections; after each one, rewrite the page, its plots and work_dir/results.json."""
    before = load_average()
    revision = git_revision()
    start = time.perf_counter()
    requested = [key for key in ALL_SECTIONS if key in only or (key == "d" and "g" in only)]

    def write(sections: dict[str, Section]) -> None:
        missing = [key for key in requested if key not in sections]
        run = {
            "command": command,
            "date": now(),
            "mode": settings.mode,
            "revision": revision,
            "minutes": (time.perf_counter() - start) / 60,
            "machine": machine_info(),
            "load_before": before,
            "load_after": load_average(),
            "load_note": load_note(before),
            "settings": dataclasses.asdict(settings),
            "settings_note": f"This page is partial: sections {', '.join(missing)} have not finished yet." if missing else "",
        }
        ordered = [sections[key] for key in ALL_SECTIONS if key in sections]
        write_page(out_dir / page, ordered, run)
        work_dir.mkdir(parents=True, exist_ok=True)
        results = {"run": run, "sections": [dataclasses.asdict(section) for section in ordered]}
        (work_dir / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        logger.info("wrote %s after %.1f min", out_dir / page, run["minutes"])

    sections = run_sections(settings, only, out_dir, work_dir, write)
    return [sections[key] for key in ALL_SECTIONS if key in sections]


def load_sections(results: dict) -> dict[str, Section]:
    sections = {}
    for stored in results["sections"]:
        stored = dict(stored)
        targets = [Target(**target) for target in stored.pop("targets")]
        sections[stored["key"]] = Section(**stored, targets=targets)
    return sections


def render_from_results(work_dir: Path, out_dir: Path, page: str, replacements: list[Path], reason: str) -> None:
    """Rewrite the page from work_dir/results.json with the current layout, running nothing.

    Sections found in the `replacements` results files (later runs with --only) take the place
    of the main run's, with a note naming the run they come from and `reason`. Explanations that
    later code derives from stored figures (the FLOP breakdown and the unigram scale of section d)
    are added where the stored run lacks them.
    """
    results = json.loads((work_dir / "results.json").read_text(encoding="utf-8"))
    by_key = load_sections(results)
    replaced: list[str] = []
    for path in replacements:
        other = json.loads(path.read_text(encoding="utf-8"))
        run = other["run"]
        for key, section in load_sections(other).items():
            section.notes.append(
                f"This section comes from a separate run, `{run['command']}` on {run['date']} at commit "
                f"{run['revision']} (load average before {run['load_before']}, after {run['load_after']}), "
                f"which replaced the main run's figures: {reason}"
            )
            by_key[key] = section
            replaced.append(section.title.split(".")[0])
    if replaced:
        results["run"]["settings_note"] = (
            f"Sections {', '.join(sorted(replaced))} come from a separate run with the same settings; the note under each says which and why."
        )
    sections = []
    for section in by_key.values():
        if section.key == "quality":
            for variant, figures in section.data.items():
                if figures.get("unigram_bpb") is None:
                    figures["unigram_bpb"] = quality.read_run_info(work_dir / f"quality-{variant}").get("unigram_validation_bpb")
            if not any(note.startswith("For scale") for note in section.notes):
                section.notes = [*quality.quality_notes(section.data), *section.notes]
            for target in section.targets:
                if target.name.startswith("d. learned FLOPs") and not target.passed and not target.profile:
                    target.profile = quality.flop_breakdown(section.data)
                    target.profile_caption = "Where the FLOPs go (forward FLOPs per token from `spikewalze evaluate`):"
        sections.append(section)
    order = {"train_step": 0, "generation": 1, "hard_gate": 2, "quality": 3, "curriculum": 4, "mfu": 5, "spike_stage": 6, "hf_baseline": 7}
    sections.sort(key=lambda section: order.get(section.key, 99))
    write_page(out_dir / page, sections, results["run"])
    logger.info("rewrote %s from %s", out_dir / page, work_dir / "results.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Smaller sizes and a 30 s quality budget (a few minutes in all).")
    parser.add_argument("--quality-budget-s", type=float, default=None, help="Training seconds per model in section d.")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="Folder of benchmarks.md and img/ (default: docs).")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench", help="Cache of data, tokenizer and runs.")
    parser.add_argument("--only", default=ALL_SECTIONS, help="Sections to run, for example 'abc' (default: all).")
    parser.add_argument("--page", default="benchmarks.md", help="File name of the page inside --out.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads here and in the commands it runs (default: torch's choice).")
    parser.add_argument("--render-only", action="store_true", help="Rewrite the page from work-dir/results.json without running anything.")
    parser.add_argument("--replace-from", type=Path, action="append", default=[], help="With --render-only: results.json of a later --only run whose sections replace the main run's. Repeatable.")
    parser.add_argument("--replace-reason", default="", help="With --replace-from: why the sections were measured again, printed on the page.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.render_only:
        render_from_results(args.work_dir, args.out, args.page, args.replace_from, args.replace_reason)
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in the train and evaluate subprocesses

    settings = Settings.quick() if args.quick else Settings.full()
    if args.quality_budget_s is not None:
        settings.quality_budget_s = args.quality_budget_s
    unknown = set(args.only) - set(ALL_SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {''.join(sorted(unknown))}; choose from {ALL_SECTIONS}")
    if any(key in args.only for key in "deg") and not SHARED_PARQUET.is_file():
        parser.error(f"sections d, e and g need the German Wikipedia parquet at {SHARED_PARQUET}; run --only abcfh without it")

    command = " ".join(["python -m benchmarks.model_bench", *(sys.argv[1:] if argv is None else argv)])
    run_benchmarks(settings, args.only, args.out, args.work_dir, command, args.page)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
