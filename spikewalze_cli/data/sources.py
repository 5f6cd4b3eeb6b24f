"""Article sources: the Hugging Face hub, local parquet/JSONL, plain text and MediaWiki XML dumps.

Every source streams `Article`s one at a time, so memory does not depend on the corpus size.
Problems the user can fix (missing file, wrong columns, broken compression, malformed XML,
bytes that are not UTF-8) raise UserError naming the file.
"""

from __future__ import annotations

import bz2
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spikewalze_cli.config import DataConfig
from spikewalze_cli.errors import UserError

BATCH_ROWS = 64  # rows converted from Arrow at a time; at most this many are read past --max-articles

SUFFIX_KINDS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".txt": "text",
    ".xml": "xml",
    ".xml.bz2": "xml",
}


@dataclass(frozen=True)
class Article:
    """One article as read from a source; `text` is wikitext when `is_wikitext` is set."""

    article_id: str
    title: str
    text: str
    is_wikitext: bool = False


@dataclass
class Source:
    """One input: the hub dataset or a local file, with counters filled while it is read."""

    kind: str  # "hub", "parquet", "json", "text" or "xml"
    location: str  # hub "dataset/config" or the file path
    id_prefix: str = ""  # file name plus ":" when several inputs could repeat article ids
    stats: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict:
        entry: dict = {"kind": self.kind, "location": self.location}
        if self.kind != "hub":
            entry["bytes"] = os.path.getsize(self.location)
        entry.update(self.stats)
        return entry


def file_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUFFIX_KINDS, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIX_KINDS[suffix]
    known = ", ".join(sorted(SUFFIX_KINDS))
    raise UserError(f"unknown input file type: {path}; use one of {known}")


def open_sources(config: DataConfig) -> list[Source]:
    """Check every input up front and return the sources in order; no inputs means the hub."""
    if not config.inputs:
        return [Source("hub", f"{config.hub_dataset}/{config.hub_config}")]

    sources = []
    for raw in config.inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise UserError(f"input file not found: {path}")
        if not path.is_file():
            raise UserError(f"input is not a file: {path}; pass a parquet, JSONL, .txt or .xml(.bz2) file")
        kind = file_kind(path)
        if path.stat().st_size == 0:
            raise UserError(f"input file is empty: {path}; pass a file that contains articles")
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as error:
            raise UserError(f"cannot read input file {path}: {error.strerror}; check its permissions") from None
        if kind == "parquet":
            _check_parquet_columns(path)
        prefix = f"{path.name}:" if len(config.inputs) > 1 else ""
        sources.append(Source(kind, str(path.resolve()), prefix))
    return sources


def _check_parquet_columns(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path} is not a readable parquet file ({error})") from None
    if "text" not in names:
        raise UserError(f"{path} has no 'text' column (columns: {', '.join(names)}); expected id, url, title, text")


def iter_articles(sources: list[Source], max_articles: int | None = None) -> Iterator[Article]:
    """Yield articles from all sources in order, stopping after `max_articles`."""
    produced = 0
    for source in sources:
        readers = {"hub": _read_hub, "parquet": _read_table, "json": _read_table, "text": _read_text, "xml": _read_xml}
        if max_articles is not None and produced >= max_articles:
            return
        for article in readers[source.kind](source):
            yield article
            produced += 1
            if max_articles is not None and produced >= max_articles:
                return  # stop before the reader parses the next article


def _rows_to_articles(source: Source, rows) -> Iterator[Article]:
    """Turn a streaming `datasets.IterableDataset` into articles.

    Rows arrive in batches of BATCH_ROWS, because converting Arrow to Python one row at a time
    costs about 30 times more CPU than converting a batch.
    """
    index = 0
    for batch in rows.iter(batch_size=BATCH_ROWS):
        if "text" not in batch:
            raise UserError(f"{source.location}: rows have no 'text' field (found: {', '.join(batch)}); expected id, url, title, text")
        count = len(batch["text"])
        ids = batch.get("id") or [None] * count
        titles = batch.get("title") or [None] * count
        for article_id, title, text in zip(ids, titles, batch["text"]):
            if not isinstance(text, str):
                raise UserError(f"{source.location}: row {index} has a 'text' of type {type(text).__name__}; expected a string")
            source.stats["articles"] = index + 1
            yield Article(source.id_prefix + (str(article_id) if article_id is not None else str(index)), str(title or ""), text)
            index += 1


def _read_hub(source: Source) -> Iterator[Article]:
    import datasets

    dataset_name, _, config_name = source.location.rpartition("/")
    try:
        rows = datasets.load_dataset(dataset_name, config_name, split="train", streaming=True)
        yield from _rows_to_articles(source, rows)
    except UserError:
        raise
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise UserError(
            f"cannot stream {source.location} from the Hugging Face hub ({type(error).__name__}: {error}); "
            "check the network or pass local files with --input"
        ) from None


def _read_table(source: Source) -> Iterator[Article]:
    """Stream parquet or JSONL through `datasets`, the same code path as the hub shards."""
    import datasets
    import pyarrow as pa

    try:
        rows = datasets.load_dataset(source.kind, data_files=[source.location], split="train", streaming=True)
        yield from _rows_to_articles(source, rows)
    except UserError:
        raise
    except UnicodeDecodeError:
        raise UserError(f"{source.location} contains bytes that are not UTF-8; re-encode it as UTF-8") from None
    except (pa.ArrowException, ValueError, OSError, datasets.exceptions.DatasetGenerationError) as error:
        detail = str(error.__cause__ or error).splitlines()[0][:300]
        if "utf" in detail.lower() or "utf" in str(error).lower():
            raise UserError(f"{source.location} contains bytes that are not UTF-8; re-encode it as UTF-8") from None
        raise UserError(f"cannot read {source.location}: {detail}") from None


def _read_text(source: Source) -> Iterator[Article]:
    """Read a plain text file as one article titled by the file name."""
    # NOTE: the whole file is read into memory at once, so split very large text files first.
    path = Path(source.location)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not valid UTF-8 (invalid byte at offset {error.start}); re-encode it as UTF-8") from None
    source.stats["articles"] = 1
    yield Article(source.id_prefix + "0", path.stem, text)


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _read_xml(source: Source) -> Iterator[Article]:
    """Stream a MediaWiki XML export: pages of namespace 0 that are not redirects."""
    path = Path(source.location)
    opener = bz2.open if path.name.lower().endswith(".bz2") else open
    stats = source.stats
    stats.update(pages=0, namespace_0_pages=0, redirects_skipped=0, articles=0)
    try:
        with opener(path, "rb") as handle:
            root = None
            for event, element in ET.iterparse(handle, events=("start", "end")):
                if root is None:
                    root = element
                if event != "end" or _local_name(element.tag) != "page":
                    continue

                stats["pages"] += 1
                page = {_local_name(child.tag): child for child in element}
                namespace = (page["ns"].text or "").strip() if "ns" in page else "0"
                if namespace == "0":
                    stats["namespace_0_pages"] += 1
                    if "redirect" in page:
                        stats["redirects_skipped"] += 1
                    else:
                        revision = {_local_name(child.tag): child for child in page.get("revision", [])}
                        text = revision["text"].text if "text" in revision else None
                        title = page["title"].text if "title" in page else ""
                        page_id = page["id"].text if "id" in page else str(stats["pages"])
                        stats["articles"] += 1
                        yield Article(source.id_prefix + (page_id or "").strip(), title or "", text or "", is_wikitext=True)
                root.clear()  # drop finished pages so memory stays flat
    except ET.ParseError as error:
        line, column = error.position
        raise UserError(
            f"{path}: malformed XML at line {line}, column {column} ({error.msg if hasattr(error, 'msg') else error}); "
            "the file may be cut off or not UTF-8"
        ) from None
    except EOFError:
        raise UserError(f"{path}: the compressed file ends early (truncated .bz2); download it again") from None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error}; check that it is a complete .xml or .xml.bz2 file") from None
