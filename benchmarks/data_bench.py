"""`make bench-data`: prepare-data and tokenizer throughput and peak memory on real German data.

Figures, all from the German Wikipedia and XML dump samples in ../shared/data:

- single-core throughput of each prepare step (clean text and XML dump to scored units), in MB of
  input per CPU second, measured in this process with `time.process_time`, so other load on a
  shared machine does not lower it;
- end-to-end `prepare_data` runs in a child process at about 10 MB and at the full 90 MB parquet:
  wall time, CPU time of the main process and of the workers, and peak RSS of each;
- tokenizer encode throughput, when `spikewalze_cli.tokenizer` is available;
- an estimate for the full German Wikipedia on 16 cores.

Writes docs/benchmarks-data.md and prints the same table. Usage:
    python -m benchmarks.data_bench [--num-proc N] [--out docs/benchmarks-data.md]
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
PARQUET = "dewiki-articles.parquet"
XML_DUMP = "dewiki-20170701-sample.xml.bz2"
SMALL_ARTICLES = 290  # about 10 MB of the parquet's text
WIKIPEDIA_MB = 9000.0  # German Wikipedia as clean text, about 2.8 million articles


# ----------------------------------------------------------------------------- single-core steps


def step_throughput(input_path: Path, max_articles: int | None, repeats: int = 1) -> dict:
    """Run every prepare step in this process on one core; return MB of input per CPU second.

    The input MB is the article text as read (wikitext for a dump). `repeats` reads the input
    that many times, so a small file still takes long enough to time.
    """
    from spikewalze_cli.config import DataConfig
    from spikewalze_cli.data.difficulty import Lexicon, count_words, log_rarity_table, score_text
    from spikewalze_cli.data.sources import iter_articles, open_sources
    from spikewalze_cli.data.units import pack_units, segment_article

    config = DataConfig(inputs=[str(input_path)])
    cpu = {}

    list(iter_articles(open_sources(config), 1))  # warm-up: imports and first file open are not timed
    start = time.process_time()
    articles = [article for _ in range(repeats) for article in iter_articles(open_sources(config), max_articles)]
    cpu["read"] = time.process_time() - start
    input_mb = sum(len(article.text.encode("utf-8")) for article in articles) / 1e6

    start = time.process_time()
    units = []
    for article in articles:
        _, _, paragraphs = segment_article(article, config.min_paragraph_chars, config.max_unit_chars)
        units += pack_units([pieces for _, pieces in paragraphs], config.min_unit_chars, config.max_unit_chars)
    cpu["segment"] = time.process_time() - start

    start = time.process_time()
    counts = count_words(units)
    lexicon = Lexicon(*log_rarity_table(counts, sum(counts.values())))
    cpu["count"] = time.process_time() - start

    start = time.process_time()
    for text in units:
        score_text(text, lexicon)
    cpu["score"] = time.process_time() - start

    total = sum(cpu.values())
    opener = bz2.open if input_path.name.endswith(".bz2") else open
    with opener(input_path, "rb") as handle:
        file_mb = repeats * sum(len(block) for block in iter(lambda: handle.read(1 << 20), b"")) / 1e6
    return {
        "file_mb": file_mb,
        "read_mb_per_cpu_second_of_file": file_mb / max(cpu["read"], 1e-9),
        "articles": len(articles),
        "units": len(units),
        "input_mb": input_mb,
        "unit_mb": sum(len(text.encode("utf-8")) for text in units) / 1e6,
        "cpu_seconds": cpu,
        "mb_per_cpu_second": {name: input_mb / max(seconds, 1e-9) for name, seconds in cpu.items()} | {"all": input_mb / total},
    }


# ----------------------------------------------------------------------------- end-to-end runs


def run_child(input_path: Path, out: Path, max_articles: int | None, num_proc: int) -> dict:
    """Run prepare_data in a fresh Python process and return its timing and memory report."""
    command = [sys.executable, "-m", "benchmarks.data_bench", "--child", str(input_path), str(out), str(max_articles or 0), str(num_proc)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"prepare-data child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_main(input_path: str, out: str, max_articles: str, num_proc: str) -> None:
    from spikewalze_cli.config import load_config
    from spikewalze_cli.data import prepare_data

    overrides = [f"data.inputs=['{input_path}']", f"data.out='{out}'", f"data.num_proc={num_proc}"]
    if int(max_articles):
        overrides.append(f"data.max_articles={max_articles}")
    start = time.perf_counter()
    prepare_data(load_config(None, overrides))
    wall = time.perf_counter() - start

    manifest = json.loads((Path(out) / "manifest.json").read_text())
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's workers, reaped at the end
    report = {
        "articles": manifest["articles_read"],
        "units": manifest["units"],
        "input_mb": manifest["input_bytes"] / 1e6,
        "wall_seconds": wall,
        "main_cpu_seconds": own.ru_utime + own.ru_stime,
        "worker_cpu_seconds": workers.ru_utime + workers.ru_stime,
        "main_peak_rss_mb": own.ru_maxrss / 1024,
        "worker_peak_rss_mb": workers.ru_maxrss / 1024,
        "num_proc": int(num_proc),
    }
    print(json.dumps(report))


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_throughput(data_dir: Path, work: Path) -> dict | str:
    """Build a tokenizer on a prepared directory and time encoding all its unit texts."""
    try:
        from spikewalze_cli.tokenizer import TokenStore, build_tokenizer
    except ImportError as error:
        return f"skipped: spikewalze_cli.tokenizer is not available ({error})"
    import datasets

    from spikewalze_cli.config import load_config

    config = load_config(None, [f"tokenizer.data='{data_dir}'", f"tokenizer.out='{work / 'tokenizer'}'", "tokenizer.vocab_size=8192"])
    build_tokenizer(config)
    tokenizer = TokenStore(work / "tokenizer").tokenizer
    texts = datasets.load_from_disk(str(data_dir / "units"))["text"]
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6

    threads = os.environ.get("RAYON_NUM_THREADS", str(os.cpu_count()))
    start = time.perf_counter()
    tokenizer.encode_batch(texts)
    batch_seconds = time.perf_counter() - start
    start = time.process_time()
    for text in texts[: len(texts) // 4]:
        tokenizer.encode(text)
    single_seconds = time.process_time() - start
    return {
        "mb": megabytes,
        "encode_batch_mb_per_second": megabytes / batch_seconds,
        "threads": threads,
        "encode_one_thread_mb_per_cpu_second": megabytes / 4 / single_seconds,
    }


# ----------------------------------------------------------------------------- difficulty check


def klexikon_pairs(data_dir: Path) -> dict:
    """Compare the mean unit score of each Klexikon article with the Wikipedia article of the same title."""
    import numpy as np

    from spikewalze_cli.config import DataConfig
    from spikewalze_cli.data.difficulty import Lexicon, count_words, log_rarity_table, score_text
    from spikewalze_cli.data.sources import iter_articles, open_sources
    from spikewalze_cli.data.units import pack_units, segment_article

    config = DataConfig()
    units: dict[str, dict[str, list[str]]] = {}
    for name in ("dewiki", "klexikon"):
        units[name] = {}
        for article in iter_articles(open_sources(DataConfig(inputs=[str(data_dir / f"{name}-articles.parquet")]))):
            _, title, paragraphs = segment_article(article, config.min_paragraph_chars, config.max_unit_chars)
            units[name][title] = pack_units([pieces for _, pieces in paragraphs], config.min_unit_chars, config.max_unit_chars)

    counts = count_words(text for by_title in units.values() for texts in by_title.values() for text in texts)
    lexicon = Lexicon(*log_rarity_table(counts, sum(counts.values())))
    mean_score = {
        name: {title: float(np.mean([score_text(text, lexicon)[0] for text in texts])) for title, texts in by_title.items() if texts}
        for name, by_title in units.items()
    }
    titles = sorted(set(mean_score["dewiki"]) & set(mean_score["klexikon"]))
    gaps = np.array([mean_score["dewiki"][title] - mean_score["klexikon"][title] for title in titles])
    return {"pairs": len(titles), "klexikon_easier": int(np.sum(gaps > 0)), "median_gap": float(np.median(gaps))}


# ----------------------------------------------------------------------------- report


def machine() -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    return {"cpu": cpu_model, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch_version}


def estimate_wikipedia(small: dict, full: dict, cores: int = 16) -> dict:
    """Estimate the wall time of the full German Wikipedia from two runs' CPU seconds per MB.

    The cost per MB is the difference between the full and the small run, which removes start-up
    costs (imports, process start). Workers scale with cores; the main process (reading,
    deduplication, packing, writing) does not, so the estimate is the larger of the two.
    """
    extra_mb = full["input_mb"] - small["input_mb"]
    worker_seconds_per_mb = (full["worker_cpu_seconds"] - small["worker_cpu_seconds"]) / extra_mb
    main_seconds_per_mb = (full["main_cpu_seconds"] - small["main_cpu_seconds"]) / extra_mb
    if full["num_proc"] == 1:  # everything ran in the main process
        worker_seconds_per_mb, main_seconds_per_mb = main_seconds_per_mb, 0.0
    worker_bound = WIKIPEDIA_MB * worker_seconds_per_mb / cores
    main_bound = WIKIPEDIA_MB * main_seconds_per_mb
    return {
        "cores": cores,
        "worker_seconds_per_mb": worker_seconds_per_mb,
        "main_seconds_per_mb": main_seconds_per_mb,
        "worker_bound_s": worker_bound,
        "main_bound_s": main_bound,
        "estimate_s": max(worker_bound, main_bound),
    }


def pages_articles_rate(xml: dict) -> float:
    """Project MB of wikitext per CPU second for a dump of articles only, with the read cost per XML MB."""
    seconds = xml["cpu_seconds"]
    per_mb = 1 / xml["read_mb_per_cpu_second_of_file"] + (seconds["segment"] + seconds["count"] + seconds["score"]) / xml["input_mb"]
    return 1 / per_mb


def render(results: dict, command: str) -> str:
    host = results["machine"]
    clean, xml = results["steps_clean"], results["steps_xml"]
    small, full = results["run_small"], results["run_full"]
    estimate = results["estimate"]
    lines = [
        "# prepare-data benchmarks",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {host['cpu']}, {host['cores']} cores, Python {host['python']}, torch {host['torch']}.",
        f"Measured {results['date']}. The machine was shared with other jobs, so wall times are noisy; "
        "the per-core figures use CPU time (`time.process_time`, `getrusage`), which that load does not lower.",
        "",
        "## Single-core throughput per step",
        "",
        "MB of input text per CPU second, every step in one process.",
        "",
        "| input | MB | units | read | segment | count words | score | all steps | target |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, steps, target in (("clean text (parquet)", clean, "3"), ("XML dump (.xml.bz2)", xml, "1")):
        rates = steps["mb_per_cpu_second"]
        lines.append(
            f"| {name} | {steps['input_mb']:.1f} | {steps['units']:,} | {rates['read']:.1f} | {rates['segment']:.1f} | "
            f"{rates['count']:.1f} | {rates['score']:.1f} | **{rates['all']:.2f}** | {target} |"
        )
    lines += [
        "",
        "For the XML dump, MB counts the raw wikitext of the articles (namespace 0, no redirects), read 5 times; "
        "cleaning it with mwparserfromhell is the segment step. The read step also parses the sample's "
        "talk, user and project pages, which make up most of its XML, so it is slower per article MB "
        f"than on a pages-articles dump. Reading runs at {xml['read_mb_per_cpu_second_of_file']:.1f} MB of XML per "
        f"CPU second; for a dump of articles only that projects to about **{pages_articles_rate(xml):.2f} MB of "
        "wikitext per CPU second** from XML to scored units (an estimate).",
        "",
        "## End-to-end prepare-data",
        "",
        "| input | articles | MB | workers | wall s | main CPU s | worker CPU s | MB per CPU s | main peak RSS MB | worker peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in (("~10 MB of the parquet", small), ("full parquet", full)):
        cpu = run["main_cpu_seconds"] + run["worker_cpu_seconds"]
        lines.append(
            f"| {name} | {run['articles']:,} | {run['input_mb']:.1f} | {run['num_proc']} | {run['wall_seconds']:.1f} | "
            f"{run['main_cpu_seconds']:.1f} | {run['worker_cpu_seconds']:.1f} | {run['input_mb'] / cpu:.2f} | "
            f"{run['main_peak_rss_mb']:.0f} | {run['worker_peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "Peak RSS of the main process grows with the corpus only through the duplicate-paragraph hashes "
        "(8 bytes per distinct paragraph), the training scores used for the stage quantiles (4 bytes per unit) "
        "and the stage column (a few bytes per unit); the text itself is streamed through Arrow shards on disk. "
        "Workers hold one shard of 8,192 units plus the word-frequency table (at most `data.max_vocab` words). "
        "The main process's peak is the same at both sizes because it is set by reading the parquet file: "
        "`datasets` reads a whole row group at a time and this file is one row group of 90 MB of text. "
        "About 300 MB of it is torch, which `datasets.IterableDataset` imports when torch is installed.",
        "",
        "## Tokenizer encode",
        "",
    ]
    tokenizer = results["tokenizer"]
    if isinstance(tokenizer, str):
        lines.append(tokenizer)
    else:
        lines.append(
            f"Byte-level BPE, vocabulary 8,192, trained by `build_tokenizer` on the ~10 MB run: `encode_batch` "
            f"{tokenizer['encode_batch_mb_per_second']:.1f} MB/s with {tokenizer['threads']} threads, `encode` one text at "
            f"a time {tokenizer['encode_one_thread_mb_per_cpu_second']:.1f} MB per CPU second ({tokenizer['mb']:.1f} MB of units)."
        )
    lines += [
        "",
        "## Difficulty check",
        "",
        f"Klexikon (a German encyclopedia for children) against German Wikipedia, same titles, score averaged over "
        f"each article's units, word frequencies counted over both: the Klexikon text scores easier in "
        f"**{results['pairs']['klexikon_easier']:,} of {results['pairs']['pairs']:,} pairs** "
        f"({results['pairs']['klexikon_easier'] / results['pairs']['pairs']:.1%}); the median score gap is "
        f"{results['pairs']['median_gap']:.2f}. `tests/test_data_prepare.py` checks every fourth title (at least 90%).",
        "",
        "## Full German Wikipedia on 16 cores (estimate)",
        "",
        f"From the difference between the two runs (start-up costs cancel): workers need "
        f"{estimate['worker_seconds_per_mb']:.3f} CPU s per MB, the main process {estimate['main_seconds_per_mb']:.3f} "
        "CPU s per MB. The main process reads, deduplicates, packs and writes units alone, so it bounds the "
        "speed on many cores. For about 2.8 million articles "
        f"and {WIKIPEDIA_MB / 1000:.0f} GB of clean text on 16 cores the workers need about "
        f"{estimate['worker_bound_s'] / 60:.0f} min and the main process about {estimate['main_bound_s'] / 60:.0f} min, "
        f"so prepare-data takes roughly **{estimate['estimate_s'] / 60:.0f} minutes**. This is an estimate: it "
        "assumes the per-MB cost of this 2,598-article sample, excludes downloading from the hub, and "
        "starting from the XML dump adds the wikitext cleaning at the XML rate above.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(*argv[1:5])
        return

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA, help="Folder with the German sample files.")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="Worker processes of the end-to-end runs.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-data.md", help="Markdown page to write.")
    args = parser.parse_args(argv)
    if not (args.data_dir / PARQUET).is_file():
        raise SystemExit(f"benchmark data not found: {args.data_dir / PARQUET}; pass --data-dir with the German sample files")

    from spikewalze_cli.console import console

    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as temp:
        work = Path(temp)
        console.print("single-core steps: clean text")
        results["steps_clean"] = step_throughput(args.data_dir / PARQUET, SMALL_ARTICLES)
        console.print("single-core steps: XML dump")
        results["steps_xml"] = step_throughput(args.data_dir / XML_DUMP, None, repeats=5)
        console.print("prepare-data on ~10 MB")
        results["run_small"] = run_child(args.data_dir / PARQUET, work / "small", SMALL_ARTICLES, args.num_proc)
        console.print("prepare-data on the full parquet")
        results["run_full"] = run_child(args.data_dir / PARQUET, work / "full", None, args.num_proc)
        console.print("difficulty check: Klexikon against Wikipedia")
        results["pairs"] = klexikon_pairs(args.data_dir)
        console.print("tokenizer")
        results["tokenizer"] = tokenizer_throughput(work / "small", work)
    results["estimate"] = estimate_wikipedia(results["run_small"], results["run_full"])

    page = render(results, "make bench-data")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    console.print(page, markup=False, highlight=False)


if __name__ == "__main__":
    main()
