"""build-tokenizer and TokenStore on a small prepared data directory made of real German paragraphs."""

from __future__ import annotations

import hashlib
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spikewalze_cli import tokenizer as tokmod
from spikewalze_cli.config import load_config
from spikewalze_cli.errors import UserError
from spikewalze_cli.tokenizer import TokenStore, build_tokenizer

# Strings a German tokenizer must reproduce byte for byte. All are NFC.
HARD_TEXTS = [
    "Äpfel, Öl und Übermut: schöne Grüße aus Köln.",
    "Die Straße heißt „Große Bleiche“ – nicht ‚Kleine‘.",
    "Emoji: 😀🇩🇪👩‍🔬 und ein Ω.",
    "Steuerzeichen:\x00\x01\x07\x1b[0m\tTab\r\nZeilenende\x7f.",
    "Ein literales <|doc|> und <|pad|> im Text.",
    "  führende und doppelte  Leerzeichen  ",
    "",
]


def write_data_dir(directory: Path, parquet: Path, articles: int = 24) -> Path:
    """Write a tiny prepared data directory per the DATA_DIR contract from real German paragraphs.

    Every fifth article goes to validation; the score is the mean word length, cut into stages A-D
    at its quartiles. The hard strings above form one extra validation article.
    """
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=["id", "title", "text"]).slice(0, articles).to_pylist()
    rows = []
    for number, article in enumerate(table):
        split = "validation" if number % 5 == 4 else "train"
        paragraphs = [p.strip() for p in article["text"].split("\n\n") if len(p.strip()) >= 40]
        for paragraph in paragraphs[:12]:
            rows.append({"article_id": article["id"], "title": article["title"], "text": paragraph, "split": split})
    for text in HARD_TEXTS:
        rows.append({"article_id": "hard", "title": "Sonderzeichen", "text": text, "split": "validation"})

    scores = np.array([np.mean([len(w) for w in row["text"].split()] or [0.0]) for row in rows], dtype=np.float32)
    edges = np.quantile(scores, [0.25, 0.5, 0.75])
    for row, score in zip(rows, scores):
        row["score"] = float(score)
        row["stage"] = "ABCD"[int(np.searchsorted(edges, score, side="right"))]
        row["mean_word_length"] = float(score)

    features = datasets.Features(
        {
            "article_id": datasets.Value("string"),
            "title": datasets.Value("string"),
            "text": datasets.Value("string"),
            "score": datasets.Value("float32"),
            "stage": datasets.Value("string"),
            "split": datasets.Value("string"),
            "mean_word_length": datasets.Value("float32"),
        }
    )
    columns = {name: [row[name] for row in rows] for name in features}
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(directory / "units"))
    (directory / "manifest.json").write_text(json.dumps({"source": str(parquet), "units": len(rows)}), encoding="utf-8")
    return directory


def tiny_config(data_dir: Path, out_dir: Path, *extra: str):
    return load_config(
        None,
        [f"tokenizer.data={data_dir}", f"tokenizer.out={out_dir}", "tokenizer.vocab_size=400", "tokenizer.batch_units=64", *extra],
    )


def dataset_rows(data_dir: Path) -> list[dict]:
    import datasets

    return datasets.load_from_disk(str(data_dir / "units")).to_list()


def tree_digest(directory: Path) -> dict[str, str]:
    """Return the SHA-256 of tokenizer.json and of every file under tokens/."""
    paths = [directory / "tokenizer.json", *sorted((directory / "tokens").iterdir())]
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


@pytest.fixture(scope="module")
def data_dir(shared_data: Path, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    return write_data_dir(directory, shared_data / "dewiki-articles.parquet")


@pytest.fixture(scope="module")
def tok_dir(data_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "tokenizer"
    return build_tokenizer(tiny_config(data_dir, out))


def test_build_writes_contract_files(tok_dir: Path, data_dir: Path):
    manifest = json.loads((tok_dir / "manifest.json").read_text())

    assert manifest["vocab_size"] == 400
    assert manifest["dtype"] == "uint16"
    assert manifest["special_tokens"] == {"doc": 0, "pad": 1}
    assert manifest["stages"] == ["A", "B", "C", "D"]
    assert manifest["data_dir"] == str(data_dir.resolve())
    assert manifest["data_manifest_sha256"] == hashlib.sha256((data_dir / "manifest.json").read_bytes()).hexdigest()
    assert manifest["tokenizer_sha256"] == hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()
    for split in ("train", "validation"):
        for stage in "ABCD":
            assert (tok_dir / "tokens" / f"{split}-{stage}.bin").is_file()
            assert (tok_dir / "tokens" / f"{split}-{stage}.units.npy").is_file()
    assert not list((tok_dir / "tokens").glob(".*")), "raw side files must be gone"
    assert not tok_dir.with_name(".tokenizer.partial").exists()

    config = load_config(tok_dir / "config.yaml")
    assert config.tokenizer.vocab_size == 400
    assert config.tokenizer.data == str(data_dir.resolve())


def test_token_files_hold_every_unit(tok_dir: Path, data_dir: Path):
    store = TokenStore(tok_dir)
    rows = dataset_rows(data_dir)

    for split in ("train", "validation"):
        for stage in store.stages:
            expected = [row for row in rows if row["split"] == split and row["stage"] == stage]
            units = store.units(split, stage)
            tokens = store.tokens(split, stage)
            count = store.count(split, stage)

            assert units.dtype == tokmod.UNIT_DTYPE
            assert len(units) == len(expected) == count["units"]
            assert len(tokens) == count["tokens"] == int(units["length"].sum())
            assert np.array_equal(units["offset"], np.concatenate([[0], np.cumsum(units["length"])[:-1]]))
            assert tokens.dtype == np.uint16
            assert int(tokens.max(initial=0)) < store.vocab_size

            for row, unit in zip(expected, units):
                ids = tokens[unit["offset"] : unit["offset"] + unit["length"]].tolist()
                assert store.tokenizer.decode(ids, skip_special_tokens=False) == row["text"]
                assert unit["bytes"] == len(row["text"].encode("utf-8"))
                assert unit["score"] == pytest.approx(row["score"])
                assert store.doc_id not in ids


def test_round_trip_all_validation_text(tok_dir: Path, data_dir: Path):
    store = TokenStore(tok_dir)
    texts = [row["text"] for row in dataset_rows(data_dir) if row["split"] == "validation"]

    assert len(texts) > 30
    for text in texts:
        ids = store.tokenizer.encode(text).ids
        assert store.tokenizer.decode(ids, skip_special_tokens=False) == text
    manifest = store.manifest
    assert manifest["validation"]["round_trip_failures"] == 0


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_round_trip_hard_strings(tok_dir: Path, text: str):
    store = TokenStore(tok_dir)
    ids = store.tokenizer.encode(text).ids

    assert store.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert store.doc_id not in ids
    assert store.pad_id not in ids


def test_round_trip_unseen_bytes(tok_dir: Path):
    """Every character encodes, even ones the corpus never had, because all 256 bytes are tokens."""
    store = TokenStore(tok_dir)
    text = "".join(chr(code) for code in range(1, 0x250)) + "\U0001f9ea\u4e2d\u6587"

    ids = store.tokenizer.encode(text).ids

    assert store.tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_round_trip_any_nfc_text(tok_dir: Path, text: str):
    store = TokenStore(tok_dir)
    text = unicodedata.normalize("NFC", text)

    ids = store.tokenizer.encode(text).ids

    assert store.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_non_nfc_input_decodes_as_nfc(tok_dir: Path):
    """NFC normalization is part of encoding, so only NFC text (what prepare-data writes) round-trips."""
    store = TokenStore(tok_dir)
    decomposed = "Mu\u0308nchen und Cafe\u0301"  # u + combining diaeresis, e + combining acute

    decoded = store.tokenizer.decode(store.tokenizer.encode(decomposed).ids)

    assert decoded == "München und Café"
    assert decoded != decomposed
    assert decoded == unicodedata.normalize("NFC", decomposed)


def test_tokenizer_loads_in_tokenizers_and_transformers(tok_dir: Path, data_dir: Path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    plain = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    wrapped = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    texts = [row["text"] for row in dataset_rows(data_dir) if row["split"] == "validation"][:20] + HARD_TEXTS[:4]

    assert auto.eos_token_id == 0
    assert auto.pad_token_id == 1
    for text in texts:
        ids = plain.encode(text).ids
        assert wrapped.encode(text, add_special_tokens=False) == ids
        assert auto.encode(text, add_special_tokens=False) == ids
        assert wrapped.decode(ids) == text


def test_fertility_and_bytes_per_token(tok_dir: Path, data_dir: Path):
    store = TokenStore(tok_dir)
    texts = [row["text"] for row in dataset_rows(data_dir) if row["split"] == "validation"]
    # Literal "<|doc|>" must count as plain text, as in the token files.
    store.tokenizer.encode_special_tokens = True
    tokens = sum(len(store.tokenizer.encode(text).ids) for text in texts)
    words = sum(len(text.split()) for text in texts)
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)

    assert store.manifest["fertility"] == pytest.approx(tokens / words)
    assert store.manifest["bytes_per_token"] == pytest.approx(num_bytes / tokens)
    # A 400-token vocabulary still merges frequent German pairs, so it beats one token per byte.
    assert store.manifest["bytes_per_token"] > 1.5


def test_same_input_same_bytes(tok_dir: Path, data_dir: Path, tmp_path: Path):
    again = build_tokenizer(tiny_config(data_dir, tmp_path / "again"))

    assert tree_digest(again) == tree_digest(tok_dir)
    assert TokenStore(again).manifest["config_hash"] == TokenStore(tok_dir).manifest["config_hash"]


def test_rerun_after_kill_is_identical(tok_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "tok"
    original_flush = tokmod.TokenWriter.flush
    calls = {"n": 0}

    def flush_then_die(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original_flush(self)

    monkeypatch.setattr(tokmod.TokenWriter, "flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_tokenizer(tiny_config(data_dir, out))
    monkeypatch.undo()

    assert not out.exists()
    assert (tmp_path / ".tok.partial" / "tokenizer.json").is_file()
    assert not (tmp_path / ".tok.partial" / "manifest.json").exists()
    with pytest.raises(UserError, match="incomplete"):
        TokenStore(tmp_path / ".tok.partial")

    build_tokenizer(tiny_config(data_dir, out))

    assert tree_digest(out) == tree_digest(tok_dir)
    assert not (tmp_path / ".tok.partial").exists()


def test_rebuild_replaces_older_build(data_dir: Path, tmp_path: Path):
    out = tmp_path / "tok"
    build_tokenizer(tiny_config(data_dir, out, "tokenizer.vocab_size=300"))
    assert TokenStore(out).vocab_size == 300

    build_tokenizer(tiny_config(data_dir, out, "tokenizer.vocab_size=350"))

    assert TokenStore(out).vocab_size == 350
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tok"]


def test_max_train_units_limits_bpe_input(data_dir: Path, tmp_path: Path):
    train_units = sum(row["split"] == "train" for row in dataset_rows(data_dir))

    out = build_tokenizer(tiny_config(data_dir, tmp_path / "tok", "tokenizer.max_train_units=50"))

    manifest = TokenStore(out).manifest
    assert manifest["bpe_training_units"] == -(-train_units // -(-train_units // 50))
    assert manifest["bpe_training_units"] <= 50
    assert sum(count["units"] for count in manifest["counts"]["train"].values()) == train_units


def test_missing_data_dir_names_prepare_data(tmp_path: Path):
    with pytest.raises(UserError, match=r"data directory not found: .*spikewalze prepare-data"):
        build_tokenizer(tiny_config(tmp_path / "nowhere", tmp_path / "tok"))
    assert not (tmp_path / "tok").exists()


def test_data_dir_without_manifest(data_dir: Path, tmp_path: Path):
    partial = tmp_path / "data"
    shutil.copytree(data_dir / "units", partial / "units")

    with pytest.raises(UserError, match=r"incomplete \(no manifest.json\).*spikewalze prepare-data"):
        build_tokenizer(tiny_config(partial, tmp_path / "tok"))
    assert not (tmp_path / "tok").exists()


def test_data_dir_without_units(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")

    with pytest.raises(UserError, match="failed to read the units"):
        build_tokenizer(tiny_config(tmp_path / "data", tmp_path / "tok"))


def test_vocab_below_bytes_and_specials_rejected(tmp_path: Path):
    with pytest.raises(UserError, match=r"257 for config key 'tokenizer\.vocab_size'.*258"):
        tiny_config(tmp_path, tmp_path / "tok", "tokenizer.vocab_size=257")


def test_minimum_vocab_is_one_token_per_byte(data_dir: Path, tmp_path: Path):
    out = build_tokenizer(tiny_config(data_dir, tmp_path / "tok", f"tokenizer.vocab_size={tokmod.MIN_VOCAB_SIZE}"))

    store = TokenStore(out)
    assert store.vocab_size == 258
    assert store.manifest["bytes_per_token"] == 1.0
    assert store.tokenizer.decode(store.tokenizer.encode(HARD_TEXTS[1]).ids) == HARD_TEXTS[1]


def test_foreign_output_dir_is_kept(data_dir: Path, tmp_path: Path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("meine Notizen")

    with pytest.raises(UserError, match="contains no tokenizer;"):
        build_tokenizer(tiny_config(data_dir, out))
    assert (out / "keep.txt").read_text() == "meine Notizen"


def test_store_rejects_missing_and_damaged_dirs(tok_dir: Path, tmp_path: Path):
    with pytest.raises(UserError, match="tokenizer directory not found"):
        TokenStore(tmp_path / "nowhere")

    damaged = tmp_path / "damaged"
    shutil.copytree(tok_dir, damaged)
    with (damaged / "tokens" / "train-A.bin").open("r+b") as handle:
        handle.truncate(2)
    with pytest.raises(UserError, match="train-A.bin is missing or not"):
        TokenStore(damaged).tokens("train", "A")
    with pytest.raises(UserError, match="no split 'train' with stage 'Z'"):
        TokenStore(damaged).tokens("train", "Z")

    (damaged / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text().replace("<|pad|>", "<|PAD|>"))
    with pytest.raises(UserError, match="does not match its manifest"):
        TokenStore(damaged)


def test_token_dtype_by_vocab_size():
    assert tokmod.token_dtype(258) == np.uint16
    assert tokmod.token_dtype(65536) == np.uint16
    assert tokmod.token_dtype(65537) == np.uint32


def test_vocab_larger_than_corpus_allows(data_dir: Path, tmp_path: Path, caplog):
    out = build_tokenizer(tiny_config(data_dir, tmp_path / "tok", "tokenizer.vocab_size=200000"))

    store = TokenStore(out)
    assert 258 < store.vocab_size < 200000
    assert store.vocab_size == store.tokenizer.get_vocab_size()
    assert store.dtype == np.uint16
    assert "BPE stopped at" in caplog.text


def test_unwritable_output_is_user_error(data_dir: Path, tmp_path: Path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("kein Verzeichnis")

    with pytest.raises(UserError, match=r"failed to build .*file.txt/tok"):
        build_tokenizer(tiny_config(data_dir, blocker / "tok"))
