"""build-tokenizer: a byte-level BPE tokenizer for German, and the token ids of every split written once.

The tokenizer normalizes to Unicode NFC, maps every UTF-8 byte to one of 256 base tokens (so any text
can be encoded) and learns merges on the training split. Then each split and difficulty stage is
tokenized once into a flat memory-mapped array, so training never re-tokenizes:

    TOK_DIR/tokenizer.json                    tokenizers byte-level BPE (loads in transformers too)
    TOK_DIR/tokens/{split}-{stage}.bin        token ids of the units, concatenated in dataset order
    TOK_DIR/tokens/{split}-{stage}.units.npy  one row per unit: offset, length, bytes, score
    TOK_DIR/config.yaml                       the effective config
    TOK_DIR/manifest.json                     written last; counts, fertility, hashes

The directory is built in a hidden sibling and renamed into place, so TOK_DIR is either the
previous complete build or the new one. `TokenStore` reads it back.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from spikewalze_cli import __version__
from spikewalze_cli.config import Config, TokenizerConfig, config_hash, write_effective_config
from spikewalze_cli.console import console
from spikewalze_cli.errors import UserError
from spikewalze_cli.io import atomic_write_json, fsync_directory, read_json, sha256_file

log = logging.getLogger(__name__)

DOC_TOKEN = "<|doc|>"  # document boundary, also end of text
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [DOC_TOKEN, PAD_TOKEN]  # ids 0 and 1, before the 256 byte tokens
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
SPLITS = ("train", "validation")
UNIT_DTYPE = np.dtype([("offset", "<i8"), ("length", "<i8"), ("bytes", "<i8"), ("score", "<f4")])
REQUIRED_COLUMNS = ("article_id", "text", "score", "stage", "split")
MANIFEST_FORMAT = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned integer type that fits every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------
# Input: the prepared data directory


def open_units(data_dir: Path):
    """Load DATA_DIR/units as a `datasets.Dataset`, or raise UserError saying what to run."""
    import datasets

    rerun = f"run `spikewalze prepare-data --out {data_dir}` first"
    if not data_dir.is_dir():
        raise UserError(f"data directory not found: {data_dir}; {rerun}")
    if not (data_dir / "manifest.json").is_file():
        raise UserError(f"data directory {data_dir} is incomplete (no manifest.json); {rerun}")
    read_json(data_dir / "manifest.json", "data manifest")
    try:
        units = datasets.load_from_disk(str(data_dir / "units"))
    except (FileNotFoundError, ValueError, OSError) as error:
        raise UserError(f"failed to read the units in {data_dir / 'units'} ({error}); {rerun}") from None
    if not isinstance(units, datasets.Dataset):
        raise UserError(f"{data_dir / 'units'} is not a single datasets.Dataset; {rerun}")

    missing = [name for name in REQUIRED_COLUMNS if name not in units.column_names]
    if missing:
        raise UserError(f"{data_dir / 'units'} lacks the columns {missing}; {rerun}")
    unknown_splits = sorted(set(units.unique("split")) - set(SPLITS))
    if unknown_splits:
        raise UserError(f"{data_dir / 'units'} has unknown split values {unknown_splits}; expected {list(SPLITS)}")
    return units


def iter_texts(units, split: str, batch_units: int, every: int = 1) -> Iterator[list[str]]:
    """Yield batches of the `text` of the units in `split`, keeping every `every`-th one, in dataset order."""
    position = 0
    for batch in units.select_columns(["text", "split"]).iter(batch_size=batch_units):
        texts = []
        for text, unit_split in zip(batch["text"], batch["split"]):
            if unit_split != split:
                continue
            if position % every == 0:
                texts.append(text)
            position += 1
        if texts:
            yield texts


# ----------------------------------------------------------------------------------------------
# Training


def new_tokenizer():
    """Return an untrained byte-level BPE tokenizer with the NFC normalizer and ByteLevel decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    # add_prefix_space=False keeps decode(encode(text)) == text: no space is invented at the start.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(units, cfg: TokenizerConfig):
    """Learn BPE merges on the training split; return the `tokenizers.Tokenizer` and the units it saw.

    NOTE: the BPE trainer keeps a count of every distinct word in memory (about 0.8 GB for 88 MB of
    German text, measured on this corpus), so set tokenizer.max_train_units for a full Wikipedia.
    """
    from tokenizers import pre_tokenizers, trainers

    num_train = _count_split(units, "train")
    if num_train == 0:
        raise UserError("the training split has no units; prepare more data (raise data.max_articles)")
    every = 1 if cfg.max_train_units is None else max(1, math.ceil(num_train / cfg.max_train_units))
    used = math.ceil(num_train / every)
    log.info("training BPE (vocab %d) on %d of %d training units", cfg.vocab_size, used, num_train)

    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is a base token even if the corpus lacks it, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=console.is_terminal,
    )
    tokenizer = new_tokenizer()
    texts = iter_texts(units, "train", cfg.batch_units, every)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=math.ceil(used / cfg.batch_units))

    for token, expected_id in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        assert tokenizer.token_to_id(token) == expected_id, f"{token} must have id {expected_id}"
    if tokenizer.get_vocab_size() < cfg.vocab_size:
        log.warning(
            "BPE stopped at %d tokens, below tokenizer.vocab_size %d, because the training text has too few "
            "pairs of min_frequency %d; the manifest records the smaller size",
            tokenizer.get_vocab_size(),
            cfg.vocab_size,
            cfg.min_frequency,
        )
    return tokenizer, used


def _count_split(units, split: str) -> int:
    import pyarrow.compute as pc

    splits = units.with_format("arrow").select_columns(["split"])[:]["split"]  # pyarrow, memory-mapped
    return int(pc.sum(pc.equal(splits, split)).as_py() or 0)


# ----------------------------------------------------------------------------------------------
# Tokenizing every split and stage


class TokenWriter:
    """Append the token ids of one split and stage to `{name}.bin` and their unit rows to `{name}.units.npy`.

    `append` collects one batch and `flush` writes it. Unit rows go to a raw side file while
    streaming and become a .npy file in `close()`, so memory stays bounded by one batch.
    """

    def __init__(self, directory: Path, name: str, dtype: np.dtype):
        self.dtype = dtype
        self.bin_path = directory / f"{name}.bin"
        self.npy_path = directory / f"{name}.units.npy"
        self.raw_path = directory / f".{name}.units.raw"
        self.bin_file = self.bin_path.open("wb")
        self.raw_file = self.raw_path.open("wb")
        self.pending_ids: list[int] = []
        self.pending_rows: list[tuple[int, int, int, float]] = []
        self.units = 0
        self.tokens = 0
        self.bytes = 0

    def append(self, ids: list[int], num_bytes: int, score: float) -> None:
        self.pending_ids.extend(ids)
        self.pending_rows.append((self.tokens, len(ids), num_bytes, score))
        self.units += 1
        self.tokens += len(ids)
        self.bytes += num_bytes

    def flush(self) -> None:
        if not self.pending_rows:
            return
        self.bin_file.write(np.asarray(self.pending_ids, dtype=self.dtype).tobytes())
        self.raw_file.write(np.asarray(self.pending_rows, dtype=UNIT_DTYPE).tobytes())
        self.pending_ids = []
        self.pending_rows = []

    def close(self) -> dict[str, int]:
        """Write what is pending, convert the unit rows to .npy and return the counts."""
        self.flush()
        self.bin_file.close()
        self.raw_file.close()

        if self.units == 0:
            np.save(self.npy_path, np.empty(0, dtype=UNIT_DTYPE))
        else:
            # Copy in chunks through memory maps, so a stage with millions of units needs little memory.
            rows = np.memmap(self.raw_path, dtype=UNIT_DTYPE, mode="r")  # [units]; 28 bytes per unit
            target = np.lib.format.open_memmap(self.npy_path, mode="w+", dtype=UNIT_DTYPE, shape=(self.units,))
            for start in range(0, self.units, 1 << 20):
                target[start : start + (1 << 20)] = rows[start : start + (1 << 20)]
            target.flush()
            del rows, target
        self.raw_path.unlink()
        return {"units": self.units, "tokens": self.tokens, "bytes": self.bytes}


class ValidationStats:
    """Running totals on the validation split: fertility, bytes per token and the round-trip check."""

    def __init__(self) -> None:
        self.words = 0
        self.tokens = 0
        self.bytes = 0
        self.round_trip_failures = 0
        self.first_failure: str | None = None

    def add(self, tokenizer, texts: list[str], ids: list[list[int]], article_ids: list[str]) -> None:
        decoded = tokenizer.decode_batch(ids, skip_special_tokens=False)
        for text, unit_ids, back, article_id in zip(texts, ids, decoded, article_ids):
            self.words += len(text.split())
            self.tokens += len(unit_ids)
            self.bytes += len(text.encode("utf-8"))
            if back != text:
                self.round_trip_failures += 1
                self.first_failure = self.first_failure or article_id

    def summary(self) -> dict:
        return {
            "words": self.words,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "fertility": self.tokens / self.words if self.words else None,
            "bytes_per_token": self.bytes / self.tokens if self.tokens else None,
            "round_trip_failures": self.round_trip_failures,
        }


def tokenize_units(units, tokenizer, tokens_dir: Path, stages: list[str], batch_units: int):
    """Encode every unit once and stream its ids into the writer of its split and stage.

    Returns (counts[split][stage] -> {units, tokens, bytes}, ValidationStats).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    dtype = token_dtype(tokenizer.get_vocab_size())
    writers = {
        (split, stage): TokenWriter(tokens_dir, f"{split}-{stage}", dtype) for split in SPLITS for stage in stages
    }
    stats = ValidationStats()
    # Wikipedia text that contains "<|doc|>" literally is encoded as plain bytes, not as the boundary.
    tokenizer.encode_special_tokens = True

    columns = ["article_id", "text", "split", "stage", "score"]
    total_bytes = 0
    start = time.perf_counter()
    progress = Progress(
        TextColumn("tokenizing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("units, {task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task("tokenize", total=len(units), rate="")
        for batch in units.select_columns(columns).iter(batch_size=batch_units):
            encodings = tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)
            ids = [encoding.ids for encoding in encodings]

            validation = [i for i, split in enumerate(batch["split"]) if split == "validation"]
            if validation:
                stats.add(
                    tokenizer,
                    [batch["text"][i] for i in validation],
                    [ids[i] for i in validation],
                    [batch["article_id"][i] for i in validation],
                )

            rows = zip(batch["text"], batch["split"], batch["stage"], batch["score"], ids)
            for text, split, stage, score, unit_ids in rows:
                num_bytes = len(text.encode("utf-8"))
                writers[(split, stage)].append(unit_ids, num_bytes, score)
                total_bytes += num_bytes
            for writer in writers.values():
                writer.flush()

            seconds = time.perf_counter() - start
            progress.update(task, advance=len(ids), rate=f"{total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s")

    seconds = time.perf_counter() - start
    megabytes = total_bytes / 1e6
    rate = megabytes / max(seconds, 1e-9)
    log.info("tokenized %d units (%.1f MB) in %.1f s: %.2f MB/s", len(units), megabytes, seconds, rate)

    counts: dict[str, dict[str, dict[str, int]]] = {split: {} for split in SPLITS}
    for (split, stage), writer in writers.items():
        counts[split][stage] = writer.close()
    return counts, stats


# ----------------------------------------------------------------------------------------------
# The command


def build_tokenizer(config: Config) -> Path:
    """Train the tokenizer, tokenize every split and stage, and publish TOK_DIR; return its path."""
    cfg = config.tokenizer
    if cfg.vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"tokenizer.vocab_size {cfg.vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE} "
            f"(256 byte tokens plus {len(SPECIAL_TOKENS)} special tokens)"
        )
    data_dir = Path(cfg.data or config.data.out).resolve()
    out_dir = Path(cfg.out).resolve()
    units = open_units(data_dir)
    _check_replaceable(out_dir)

    # Build in a hidden sibling; a leftover from a killed run is removed, so a rerun starts over.
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "tokens").mkdir(parents=True)
        manifest = _build_into(partial, config, units, data_dir)
        _publish(partial, out_dir)
    except OSError as error:
        raise UserError(
            f"failed to build {out_dir}: {error.strerror or error} ({error.filename}); "
            "check free space and that the output's parent directory is writable"
        ) from None

    _print_summary(manifest)
    log.info("tokenizer written to %s", out_dir)
    return out_dir


def _build_into(partial: Path, config: Config, units, data_dir: Path) -> dict:
    """Train, tokenize and write every file into `partial`, manifest.json last; return the manifest."""
    cfg = config.tokenizer
    stages = sorted(units.unique("stage"))
    tokenizer, bpe_units = train_tokenizer(units, cfg)
    tokenizer.save(str(partial / "tokenizer.json"))
    _write_transformers_config(partial)

    counts, stats = tokenize_units(units, tokenizer, partial / "tokens", stages, cfg.batch_units)
    validation = stats.summary()
    if stats.round_trip_failures:
        log.warning(
            "decode(encode(text)) differs from the text for %d validation units (first in article %s); "
            "check that prepare-data wrote NFC text",
            stats.round_trip_failures,
            stats.first_failure,
        )

    effective = config.model_copy(deep=True)
    effective.tokenizer.data = str(data_dir)
    write_effective_config(effective, partial)

    vocab_size = tokenizer.get_vocab_size()
    manifest = {
        "format": MANIFEST_FORMAT,
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "special_tokens": {"doc": tokenizer.token_to_id(DOC_TOKEN), "pad": tokenizer.token_to_id(PAD_TOKEN)},
        "tokenizer_sha256": sha256_file(partial / "tokenizer.json"),
        "data_dir": str(data_dir),
        "data_manifest_sha256": sha256_file(data_dir / "manifest.json"),
        "stages": stages,
        "counts": counts,
        "fertility": validation["fertility"],
        "bytes_per_token": validation["bytes_per_token"],
        "validation": validation,
        "bpe_training_units": bpe_units,
        # Hash of the settings alone, so the same settings give the same hash in any directory.
        "config_hash": config_hash(cfg.model_copy(update={"data": None, "out": ""})),
        "versions": _versions(),
    }
    atomic_write_json(partial / "manifest.json", manifest)
    return manifest


def _check_replaceable(out_dir: Path) -> None:
    """Raise UserError unless `out_dir` is absent, empty or an earlier tokenizer directory."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"tokenizer output {out_dir} is a file; choose a directory with --out")
    manifest = out_dir / "manifest.json"
    foreign = manifest.is_file() and read_json(manifest, "manifest").get("format") != MANIFEST_FORMAT
    if any(out_dir.iterdir()) and (foreign or not (out_dir / "tokenizer.json").is_file()):
        raise UserError(
            f"tokenizer output {out_dir} is not empty and contains no tokenizer; "
            "choose another --out or remove the directory"
        )


def _publish(partial: Path, out_dir: Path) -> None:
    """Rename the finished `partial` directory to `out_dir`, replacing an older build."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    fsync_directory(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def _write_transformers_config(directory: Path) -> None:
    """Write tokenizer_config.json so `transformers.AutoTokenizer.from_pretrained(TOK_DIR)` works."""
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": DOC_TOKEN,
        "eos_token": DOC_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _versions() -> dict[str, str]:
    import datasets
    import tokenizers

    return {"spikewalze": __version__, "tokenizers": tokenizers.__version__, "datasets": datasets.__version__}


def _print_summary(manifest: dict) -> None:
    from rich.table import Table

    table = Table(title=f"Tokens per split and stage (vocab {manifest['vocab_size']}, {manifest['dtype']})")
    for name in ("split", "stage", "units", "tokens", "MB", "bytes/token"):
        table.add_column(name, justify="left" if name in ("split", "stage") else "right")
    for split, stages in manifest["counts"].items():
        for stage, count in stages.items():
            per_token = f"{count['bytes'] / count['tokens']:.2f}" if count["tokens"] else "-"
            megabytes = f"{count['bytes'] / 1e6:.2f}"
            table.add_row(split, stage, f"{count['units']:,}", f"{count['tokens']:,}", megabytes, per_token)
    console.print(table)

    validation = manifest["validation"]
    if validation["tokens"]:
        console.print(
            f"validation: fertility {validation['fertility']:.3f} tokens per word, "
            f"{validation['bytes_per_token']:.3f} bytes per token, "
            f"round trip failed for {validation['round_trip_failures']} units"
        )
    else:
        console.print("validation: the split is empty, so fertility and bytes per token are not measured")


# ----------------------------------------------------------------------------------------------
# Reading a tokenizer directory back


class TokenStore:
    """A complete tokenizer directory: the tokenizer, its manifest and the memory-mapped token ids.

    `tokenizer` encodes "<|doc|>" in user text as plain bytes, as the corpus was encoded; add the
    boundary with `doc_id`.
    """

    def __init__(self, tok_dir: Path | str):
        from tokenizers import Tokenizer

        self.dir = Path(tok_dir)
        rerun = f"run `spikewalze build-tokenizer --out {self.dir}`"
        if not self.dir.is_dir():
            raise UserError(f"tokenizer directory not found: {self.dir}; {rerun}")
        if not (self.dir / "manifest.json").is_file():
            raise UserError(f"tokenizer directory {self.dir} is incomplete (no manifest.json); {rerun} again")
        self.manifest: dict = read_json(self.dir / "manifest.json", "tokenizer manifest")
        if self.manifest.get("format") != MANIFEST_FORMAT:
            if self.manifest.get("format") == "spikewalze-data":
                raise UserError(f"{self.dir} is a prepared data directory, not a tokenizer directory; pass the output of build-tokenizer")
            raise UserError(f"{self.dir} is not a tokenizer directory (its manifest.json is not from build-tokenizer); {rerun}")

        tokenizer_path = self.dir / "tokenizer.json"
        if not tokenizer_path.is_file() or sha256_file(tokenizer_path) != self.manifest["tokenizer_sha256"]:
            raise UserError(f"{tokenizer_path} is missing or does not match its manifest; {rerun} again")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.encode_special_tokens = True

    @property
    def doc_id(self) -> int:
        return int(self.manifest["special_tokens"]["doc"])

    @property
    def pad_id(self) -> int:
        return int(self.manifest["special_tokens"]["pad"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def stages(self) -> list[str]:
        return list(self.manifest["stages"])

    def count(self, split: str, stage: str) -> dict[str, int]:
        """Return {units, tokens, bytes} of one split and stage."""
        try:
            return self.manifest["counts"][split][stage]
        except KeyError:
            raise UserError(f"{self.dir} has no split {split!r} with stage {stage!r}; stages are {self.stages}") from None

    def tokens(self, split: str, stage: str) -> np.ndarray:
        """Return the token ids of one split and stage as a read-only memmap ([tokens], manifest dtype)."""
        expected = self.count(split, stage)["tokens"]
        path = self.dir / "tokens" / f"{split}-{stage}.bin"
        if not path.is_file() or path.stat().st_size != expected * self.dtype.itemsize:
            raise UserError(f"{path} is missing or not {expected} tokens long; rerun `spikewalze build-tokenizer`")
        if expected == 0:
            return np.empty(0, dtype=self.dtype)  # mmap cannot map an empty file
        return np.memmap(path, dtype=self.dtype, mode="r")

    def units(self, split: str, stage: str) -> np.ndarray:
        """Return the unit index of one split and stage: rows of (offset, length, bytes, score)."""
        expected = self.count(split, stage)["units"]
        path = self.dir / "tokens" / f"{split}-{stage}.units.npy"
        try:
            rows = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UserError(f"failed to read {path} ({error}); rerun `spikewalze build-tokenizer`") from None
        if rows.dtype != UNIT_DTYPE or len(rows) != expected:
            raise UserError(f"{path} does not match its manifest; rerun `spikewalze build-tokenizer`")
        return rows
