"""prepare-data: articles in, difficulty-scored and staged training units out.

The run makes three passes and writes everything into a hidden `.NAME.partial` directory beside
the output, which replaces the output only after `manifest.json` is written:

1. segment (worker processes): clean wikitext, NFC, split paragraphs, cut long ones at sentence
   ends. The main process drops exact-duplicate paragraphs, packs units and writes Arrow shards.
2. count (workers): lower-cased word frequencies over all units, merged by the main process.
   score (workers): features, combined score and split for each unit, one scored shard per shard.
3. assemble (main): stage thresholds from the training scores' quantiles, the `datasets` dataset
   under `units/`, config.yaml and, last, manifest.json.

Work is cut into chunks whose boundaries depend only on the input, and results are consumed in
input order, so the output bytes do not depend on the number of processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import string
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spikewalze_cli.config import Config, DataConfig
from spikewalze_cli.console import console
from spikewalze_cli.data.difficulty import FEATURES, Lexicon, count_words, log_rarity_table, score_text, sentence_ends
from spikewalze_cli.data.sources import Article, Source, iter_articles, open_sources
from spikewalze_cli.data.units import SeenParagraphs, pack_units, segment_article, split_position
from spikewalze_cli.errors import UserError
from spikewalze_cli.io import sha256_file

log = logging.getLogger(__name__)

STAGE_LETTERS = string.ascii_uppercase
CHUNK_CHARS = 1 << 20  # articles per work item: about 1 MB of text ...
CHUNK_ARTICLES = 256  # ... or this many, whichever comes first
SHARD_UNITS = 8192  # units per intermediate Arrow shard
MANIFEST_FORMAT = "spikewalze-data"


# ----------------------------------------------------------------------------- process pool


def _num_workers(config: DataConfig) -> int:
    return config.num_proc or os.cpu_count() or 1


class Workers:
    """A process pool (or the current process when one worker is asked for) with ordered results."""

    def __init__(self, count: int) -> None:
        self.count = count
        # spawn: workers start clean, without the parent's Arrow thread pools that fork would copy.
        self.pool = multiprocessing.get_context("spawn").Pool(count) if count > 1 else None

    def map(self, function: Callable, items: Iterable) -> Iterator:
        """Yield function(item) in input order, with at most 2 * count items in flight."""
        if self.pool is None:
            yield from map(function, items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self.pool.apply_async(function, (item,)))
            if len(pending) >= 2 * self.count:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# ----------------------------------------------------------------------------- pass 1: segment


def _segment_chunk(task: tuple[list[Article], int, int]) -> list:
    articles, min_paragraph_chars, max_unit_chars = task
    return [segment_article(article, min_paragraph_chars, max_unit_chars) for article in articles]


def _chunks(articles: Iterable[Article], on_read: Callable[[int], None]) -> Iterator[list[Article]]:
    chunk: list[Article] = []
    chars = 0
    for article in articles:
        chunk.append(article)
        chars += len(article.text)
        on_read(len(article.text.encode("utf-8")))
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_ARTICLES:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class ShardWriter:
    """Buffer unit rows and write them as numbered Arrow IPC files of SHARD_UNITS rows."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rows: dict[str, list[str]] = {"article_id": [], "title": [], "text": []}
        self.paths: list[Path] = []

    def add(self, article_id: str, title: str, units: list[str]) -> None:
        for unit in units:
            self.rows["article_id"].append(article_id)
            self.rows["title"].append(title)
            self.rows["text"].append(unit)
            if len(self.rows["text"]) >= SHARD_UNITS:
                self.flush()

    def flush(self) -> None:
        if not self.rows["text"]:
            return
        path = self.directory / f"units-{len(self.paths):05d}.arrow"
        _write_arrow(path, pa.table({name: pa.array(values, pa.string()) for name, values in self.rows.items()}))
        self.paths.append(path)
        for values in self.rows.values():
            values.clear()


def _write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


# ----------------------------------------------------------------------------- pass 2: count and score


def _count_shard(path: Path) -> Counter:
    return count_words(_read_arrow(path).column("text").to_pylist())


_RARITY: dict[str, Any] = {}


def _load_lexicon(path: Path) -> Lexicon:
    """Load the rarity table once per worker process."""
    if _RARITY.get("path") != path:
        table = _read_arrow(path)
        log_rarity = dict(zip(table.column("word").to_pylist(), table.column("value").to_pylist()))
        _RARITY.update(path=path, lexicon=Lexicon(log_rarity, float(table.schema.metadata[b"unseen"])))
    return _RARITY["lexicon"]


def _score_shard(task: tuple[Path, Path, Path, int, float, str | None]) -> np.ndarray:
    """Score one units shard, write the scored shard and return its training scores (float32)."""
    source, target, rarity_path, seed, validation_fraction, forced_validation = task
    lexicon = _load_lexicon(rarity_path)
    table = _read_arrow(source)
    texts = table.column("text").to_pylist()
    article_ids = table.column("article_id").to_pylist()

    scores = np.empty(len(texts), dtype=np.float32)
    features = {name: np.empty(len(texts), dtype=np.float32) for name in FEATURES}
    for row, text in enumerate(texts):
        scores[row], values = score_text(text, lexicon)
        for name in FEATURES:
            features[name][row] = values[name]

    splits = [
        "validation" if article_id == forced_validation or split_position(article_id, seed) < validation_fraction else "train"
        for article_id in article_ids
    ]
    columns = {
        "article_id": table.column("article_id"),
        "title": table.column("title"),
        "text": table.column("text"),
        "score": pa.array(scores),
        "split": pa.array(splits, pa.string()),
        **{name: pa.array(values) for name, values in features.items()},
    }
    _write_arrow(target, pa.table(columns))
    return scores[np.asarray(splits) == "train"]


def _write_rarity(path: Path, counts: Counter, total: int) -> int:
    table, unseen = log_rarity_table(counts, total)
    words = sorted(table)  # sorted so the file, like every output, is the same for the same input
    arrow = pa.table({"word": pa.array(words, pa.string()), "value": pa.array([table[w] for w in words], pa.float64())})
    _write_arrow(path, arrow.replace_schema_metadata({"unseen": repr(unseen)}))
    return len(words)


# ----------------------------------------------------------------------------- progress and output


def _progress():
    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Articles per second and input megabytes per second since the task started."""

        def render(self, task) -> Text:
            elapsed = task.elapsed or 0.0
            if elapsed <= 0 or "bytes" not in task.fields:
                return Text("")
            return Text(f"{task.completed / elapsed:,.0f} articles/s  {task.fields['bytes'] / elapsed / 1e6:.1f} MB/s")

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}{task.fields[unit]}"),
        RateColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,  # logs and pipes get the summary table instead
    )


def _check_output(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; choose another --out")
    if not any(out.iterdir()):
        return
    # Only an earlier prepare-data output may be replaced: a tokenizer or checkpoint directory
    # also has a manifest.json, and replacing it would delete what a run depends on.
    manifest = out / "manifest.json"
    try:
        kind = json.loads(manifest.read_text(encoding="utf-8")).get("format") if manifest.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        kind = None
    if kind != MANIFEST_FORMAT:
        raise UserError(f"output directory {out} is not empty and contains no prepared data; choose another --out or remove it")


def _write_error(error: OSError, out: Path) -> Exception:
    """Turn a full disk or a permission problem into a UserError; return other errors unchanged.

    pyarrow raises OSError without `errno` set, so its message is checked as well.
    """
    text = str(error)
    if error.errno == errno.ENOSPC or "No space left on device" in text:
        return UserError(f"No space left on device while writing {out}; free space and run prepare-data again")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text:
        return UserError(f"cannot write {out}: permission denied; choose a writable --out")
    return error


def _replace_directory(partial: Path, out: Path) -> None:
    """Move the finished `partial` into place; an older complete output is removed after the swap."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- the command


def prepare_data(config: Config) -> Path:
    """Run prepare-data with `config.data`; return the finished data directory."""
    data = config.data
    if data.max_unit_chars < data.min_unit_chars:
        raise UserError("data.min_unit_chars must not exceed data.max_unit_chars")
    out = Path(data.out).expanduser()
    _check_output(out)
    sources = open_sources(data)

    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # a run that was killed leaves this behind
    workers = Workers(_num_workers(data))
    started = time.perf_counter()
    try:
        (partial / "scratch").mkdir(parents=True)
        summary = _prepare_into(partial, config, sources, workers)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        _finish(partial, config, sources, summary)
        _replace_directory(partial, out)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise _write_error(error, out) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        workers.close()

    _print_summary(out, summary)
    return out


def _prepare_into(partial: Path, config: Config, sources: list[Source], workers: Workers) -> dict:
    data = config.data
    scratch = partial / "scratch"
    summary: dict[str, Any] = {}

    unit_paths, forced_validation = _segment_pass(scratch, data, sources, workers, summary)
    rarity_path = _count_pass(scratch, data, unit_paths, workers, summary)
    scored_paths, train_scores = _score_pass(unit_paths, rarity_path, data, forced_validation, workers)

    # Pass 3: stages by quantiles of the training scores, then the datasets output.
    thresholds = stage_thresholds(train_scores, data.num_stages)
    summary["score_quantiles"] = [float(value) for value in thresholds]
    summary["stage_medians"] = _stage_medians(train_scores, thresholds, data.num_stages)
    del train_scores
    summary.update(_assemble(partial / "units", scored_paths, thresholds, data.num_stages, summary["stage_medians"]))
    shutil.rmtree(scratch)
    return summary


def _segment_pass(scratch: Path, data: DataConfig, sources: list[Source], workers: Workers, summary: dict) -> tuple[list[Path], str | None]:
    """Pass 1: segment articles in the workers, then deduplicate, pack and write units here.

    Returns the unit shards and the article moved to validation when the hash split left it
    empty (else None). Fills the article, byte and paragraph counts of `summary`.
    """
    writer = ShardWriter(scratch)
    seen = SeenParagraphs()
    summary.update(articles_read=0, input_bytes=0, paragraphs_kept=0, duplicate_paragraphs_removed=0, articles_without_units=0)
    split_counts = Counter()
    first_train: tuple[float, str] | None = None  # lowest split position among training articles

    def on_read(size: int) -> None:
        summary["input_bytes"] += size

    # NOTE: this process reads the input alone (about 20 MB/s from parquet through `datasets`),
    # which bounds the speed on many cores; see docs/benchmarks-data.md.
    articles = iter_articles(sources, data.max_articles)
    chunks = ((chunk, data.min_paragraph_chars, data.max_unit_chars) for chunk in _chunks(articles, on_read))
    with _progress() as progress:
        task = progress.add_task("segment", total=data.max_articles, unit=" articles", bytes=0)
        for results in workers.map(_segment_chunk, chunks):
            for article_id, title, paragraphs in results:
                kept = []
                for paragraph_hash, pieces in paragraphs:
                    if seen.add(paragraph_hash):
                        kept.append(pieces)
                    else:
                        summary["duplicate_paragraphs_removed"] += 1
                summary["paragraphs_kept"] += len(kept)
                units = pack_units(kept, data.min_unit_chars, data.max_unit_chars)
                if not units:
                    summary["articles_without_units"] += 1
                    continue
                writer.add(article_id, title, units)

                position = split_position(article_id, data.seed)
                split = "validation" if position < data.validation_fraction else "train"
                split_counts[split] += 1
                if split == "train" and (first_train is None or (position, article_id) < first_train):
                    first_train = (position, article_id)
            summary["articles_read"] += len(results)
            progress.update(task, completed=summary["articles_read"], bytes=summary["input_bytes"])
        writer.flush()

    locations = ", ".join(source.location for source in sources)
    if summary["articles_read"] == 0:
        raise UserError(f"no articles found in {locations}; check the input files")
    if not writer.paths:
        raise UserError(
            f"no usable text in {locations}: {summary['articles_read']} articles read, but no paragraph has "
            f"data.min_paragraph_chars={data.min_paragraph_chars} characters and a word"
        )

    # With few articles the hash split can leave validation empty. Then the training article with
    # the lowest split position moves to validation, so the split stays deterministic.
    forced_validation = None
    if split_counts["validation"] == 0 and split_counts["train"] > 1 and first_train is not None:
        forced_validation = first_train[1]
        split_counts["train"] -= 1
        split_counts["validation"] += 1
        log.info("no article fell into validation by hash; moving article %s there", forced_validation)
    elif split_counts["validation"] == 0:
        log.warning("only one article with text: the validation split is empty")
    if split_counts["train"] == 0:
        raise UserError(
            f"all {split_counts['validation']} articles fell into the validation split; "
            "lower data.validation_fraction or add articles"
        )
    summary["articles"] = {"train": split_counts["train"], "validation": split_counts["validation"]}
    return writer.paths, forced_validation


def _count_pass(scratch: Path, data: DataConfig, unit_paths: list[Path], workers: Workers, summary: dict) -> Path:
    """Pass 2a: count corpus word frequencies and write the rarity table; return its path."""
    counts: Counter = Counter()
    total_words = 0
    pruned = False
    with _progress() as progress:
        task = progress.add_task("count words", total=len(unit_paths), unit=" shards")
        for shard_counts in workers.map(_count_shard, unit_paths):
            total_words += sum(shard_counts.values())
            counts.update(shard_counts)
            if len(counts) > 2 * data.max_vocab:
                # NOTE: pruning drops the counts of rare words seen so far, so they count as unseen (rarest).
                counts = Counter(dict(counts.most_common(data.max_vocab)))
                pruned = True
            progress.advance(task)

    rarity_path = scratch / "rarity.arrow"
    vocabulary = _write_rarity(rarity_path, counts, total_words)
    summary["vocabulary"] = {"word_tokens": total_words, "word_types_kept": vocabulary, "pruned": pruned}
    return rarity_path


def _score_pass(
    unit_paths: list[Path], rarity_path: Path, data: DataConfig, forced_validation: str | None, workers: Workers
) -> tuple[list[Path], np.ndarray]:
    """Pass 2b: features, score and split of every unit; return the scored shards and the training scores."""
    scored_paths = [path.with_name(path.name.replace("units-", "scored-")) for path in unit_paths]
    tasks = [
        (source, target, rarity_path, data.seed, data.validation_fraction, forced_validation)
        for source, target in zip(unit_paths, scored_paths)
    ]
    train_scores = []
    with _progress() as progress:
        task = progress.add_task("score", total=len(tasks), unit=" shards")
        for shard_scores in workers.map(_score_shard, tasks):
            train_scores.append(shard_scores)
            progress.advance(task)

    for path in unit_paths:
        path.unlink()
    return scored_paths, np.concatenate(train_scores)


def stage_thresholds(train_scores: np.ndarray, num_stages: int) -> np.ndarray:
    """Return the num_stages - 1 score quantiles that separate the stages (float64, ascending)."""
    probabilities = np.arange(1, num_stages) / num_stages
    return np.quantile(train_scores.astype(np.float64), probabilities)


def assign_stages(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Return the stage letter of each score: "A" below the first threshold, and so on upward."""
    letters = np.array(list(STAGE_LETTERS[: len(thresholds) + 1]))
    return letters[np.searchsorted(thresholds, scores.astype(np.float64), side="right")]


def _stage_medians(train_scores: np.ndarray, thresholds: np.ndarray, num_stages: int) -> list[float]:
    stages = np.searchsorted(thresholds, train_scores.astype(np.float64), side="right")
    return [float(np.median(train_scores[stages == k])) if np.any(stages == k) else float("nan") for k in range(num_stages)]


def _assemble(units_dir: Path, scored_paths: list[Path], thresholds: np.ndarray, num_stages: int, medians: list[float]) -> dict:
    """Add the stage column, save the dataset and collect counts, feature means and examples."""
    import datasets

    stages = list(STAGE_LETTERS[:num_stages])
    counts = {split: {stage: {"units": 0, "chars": 0} for stage in stages} for split in ("train", "validation")}
    feature_sums = {stage: dict.fromkeys(["score", *FEATURES], 0.0) for stage in stages}
    stage_units = dict.fromkeys(stages, 0)
    examples: dict[str, tuple[float, str]] = {}
    parts = []
    for path in scored_paths:
        table = _read_arrow(path)
        scores = table.column("score").to_numpy()
        stage_column = assign_stages(scores, thresholds)
        splits = np.asarray(table.column("split").to_pylist())
        lengths = pc.utf8_length(table.column("text")).to_numpy()
        for split in ("train", "validation"):
            in_split = splits == split
            for stage in stages:
                mask = in_split & (stage_column == stage)
                counts[split][stage]["units"] += int(mask.sum())
                counts[split][stage]["chars"] += int(lengths[mask].sum())
        for stage_index, stage in enumerate(stages):
            mask = stage_column == stage
            stage_units[stage] += int(mask.sum())
            for name in feature_sums[stage]:
                feature_sums[stage][name] += float(table.column(name).to_numpy()[mask].astype(np.float64).sum())
            if mask.any():
                candidates = np.flatnonzero(mask)
                best = candidates[np.argmin(np.abs(scores[candidates] - medians[stage_index]))]
                distance = float(abs(scores[best] - medians[stage_index]))
                if stage not in examples or distance < examples[stage][0]:
                    examples[stage] = (distance, table.column("text")[int(best)].as_py())
        part = datasets.Dataset.from_file(str(path))
        parts.append(part.add_column("stage", stage_column.tolist()))

    dataset = datasets.concatenate_datasets(parts)
    order = ["article_id", "title", "text", "score", "stage", "split", *FEATURES]
    # datasets gives a table read from a file a random fingerprint, which save_to_disk writes to
    # units/state.json; a fingerprint from the content keeps the output byte-identical per input.
    content = hashlib.sha256(np.asarray(thresholds, dtype=np.float64).tobytes())
    for path in scored_paths:
        content.update(sha256_file(path).encode())
    dataset = dataset.select_columns(order, new_fingerprint=content.hexdigest()[:16])
    bars_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the rich bars above already show progress
    try:
        dataset.save_to_disk(str(units_dir))
    finally:
        if bars_enabled:
            datasets.enable_progress_bars()

    feature_means = {
        stage: {name: (total / stage_units[stage] if stage_units[stage] else None) for name, total in sums.items()}
        for stage, sums in feature_sums.items()
    }
    return {
        "units": len(dataset),
        "counts": counts,
        "feature_means": feature_means,
        "examples": {stage: _first_sentence(text) for stage, (_, text) in examples.items()},
    }


def _first_sentence(text: str, limit: int = 90) -> str:
    """Return the unit's first sentence of 30 to `limit` characters, else its start cut to `limit`."""
    lines = [line for line in text.split("\n") if line.strip() and not line.lstrip().startswith("=")]  # no headings
    text = " ".join(" ".join(lines).split())
    start = 0
    for end in [*sentence_ends(text), len(text)]:
        sentence = text[start:end].strip()
        start = end
        if 30 <= len(sentence) <= limit:
            return sentence
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _finish(partial: Path, config: Config, sources: list[Source], summary: dict) -> None:
    """Write config.yaml and then manifest.json, the file that marks the directory complete."""
    import datasets
    import mwparserfromhell
    import pyphen

    from spikewalze_cli import __version__
    from spikewalze_cli.config import config_hash, write_effective_config
    from spikewalze_cli.data.difficulty import REFERENCE
    from spikewalze_cli.io import atomic_write_json

    write_effective_config(config, partial)
    data = config.data
    stages = list(STAGE_LETTERS[: data.num_stages])
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": [source.describe() for source in sources],
        "max_articles": data.max_articles,
        "articles_read": summary["articles_read"],
        "input_bytes": summary["input_bytes"],
        "articles": summary["articles"],
        "paragraphs": {
            "kept": summary["paragraphs_kept"],
            "duplicates_removed": summary["duplicate_paragraphs_removed"],
            "articles_without_units": summary["articles_without_units"],
        },
        "units": summary["units"],
        "stages": stages,
        "splits": ["train", "validation"],
        "counts": summary["counts"],
        "score_quantiles": summary["score_quantiles"],
        "feature_means": summary["feature_means"],
        "features": list(FEATURES),
        "score_reference": {name: {"mean": m, "std": s, "direction": d} for name, (m, s, d) in REFERENCE.items()},
        "vocabulary": summary["vocabulary"],
        "examples": summary["examples"],
        "seconds": summary["seconds"],
        "versions": {
            "spikewalze": __version__,
            "datasets": datasets.__version__,
            "pyarrow": pa.__version__,
            "mwparserfromhell": mwparserfromhell.__version__,
            "pyphen": getattr(pyphen, "__version__", "unknown"),
        },
        # Hash only the settings that shape the units, so the same input gives the same manifest.
        "config_hash": config_hash(data.model_copy(update={"out": "", "num_proc": None})),
    }
    atomic_write_json(partial / "manifest.json", manifest)


def _print_summary(out: Path, summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"prepared {summary['units']:,} units in {out}", title_justify="left")
    table.add_column("stage")
    table.add_column("train units", justify="right")
    table.add_column("validation units", justify="right")
    table.add_column("mean score", justify="right")
    table.add_column("example")
    for stage, means in summary["feature_means"].items():
        mean = means["score"]
        table.add_row(
            stage,
            f"{summary['counts']['train'][stage]['units']:,}",
            f"{summary['counts']['validation'][stage]['units']:,}",
            "-" if mean is None else f"{mean:+.2f}",
            summary["examples"].get(stage, ""),
        )
    console.print(table)
    console.print(
        f"{summary['articles_read']:,} articles, {summary['input_bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s "
        f"({summary['input_bytes'] / 1e6 / max(summary['seconds'], 1e-9):.2f} MB/s); "
        f"{summary['duplicate_paragraphs_removed']:,} duplicate paragraphs removed"
    )
