"""prepare-data end to end on real German articles: output contract, stages, splits, determinism, bad input."""

from __future__ import annotations

import bz2
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from spikewalze_cli.cli import app
from spikewalze_cli.config import load_config
from spikewalze_cli.data import assign_stages, prepare_data, stage_thresholds
from spikewalze_cli.data.difficulty import FEATURES
from spikewalze_cli.data.units import cut_paragraph, pack_units
from spikewalze_cli.errors import UserError

ARTICLES = 40


def prepare(shared_data: Path, out: Path, *overrides: str, inputs: list[Path] | None = None) -> Path:
    paths = inputs or [shared_data / "dewiki-articles.parquet"]
    config = load_config(
        None,
        [
            "data.inputs=[" + ", ".join(f"'{path}'" for path in paths) + "]",
            f"data.out='{out}'",
            f"data.max_articles={ARTICLES}",
            "data.num_proc=1",
            *overrides,
        ],
    )
    return prepare_data(config)


def read_units(out: Path) -> list[dict]:
    import datasets

    return datasets.load_from_disk(str(out / "units")).to_list()


def output_digest(out: Path) -> dict[str, str]:
    """Hash every Arrow file and the manifest without its timing fields."""
    digests = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted((out / "units").glob("*.arrow"))}
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("created", "seconds"):
        manifest.pop(key)
    digests["manifest"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def prepared(shared_data: Path, tmp_path_factory) -> Path:
    return prepare(shared_data, tmp_path_factory.mktemp("prepared") / "data")


def test_output_follows_contract(prepared: Path):
    manifest = json.loads((prepared / "manifest.json").read_text())
    rows = read_units(prepared)

    assert (prepared / "config.yaml").is_file()
    assert not list(prepared.parent.glob(".data.*"))  # no partial or old directory left behind
    assert manifest["articles_read"] == ARTICLES
    assert manifest["stages"] == ["A", "B", "C", "D"]
    assert manifest["units"] == len(rows) > 100
    assert set(rows[0]) == {"article_id", "title", "text", "score", "stage", "split", *FEATURES}
    for split in ("train", "validation"):
        for stage in "ABCD":
            expected = sum(1 for row in rows if row["split"] == split and row["stage"] == stage)
            assert manifest["counts"][split][stage]["units"] == expected
    assert all(row["text"] and len(row["text"]) <= 2000 for row in rows)
    assert sum(len(row["text"]) >= 200 for row in rows) / len(rows) > 0.9


def test_stages_split_training_scores_evenly(prepared: Path):
    rows = read_units(prepared)
    train = [row for row in rows if row["split"] == "train"]
    per_stage = {stage: sum(1 for row in train if row["stage"] == stage) for stage in "ABCD"}
    assert max(per_stage.values()) - min(per_stage.values()) <= 1
    for lower, upper in zip("ABC", "BCD"):
        assert max(row["score"] for row in rows if row["stage"] == lower) <= min(row["score"] for row in rows if row["stage"] == upper)
    manifest = json.loads((prepared / "manifest.json").read_text())
    means = [manifest["feature_means"][stage]["score"] for stage in "ABCD"]
    assert means == sorted(means)


def test_split_is_by_article(prepared: Path):
    rows = read_units(prepared)
    train = {row["article_id"] for row in rows if row["split"] == "train"}
    validation = {row["article_id"] for row in rows if row["split"] == "validation"}
    assert train and validation
    assert not train & validation
    assert len(train | validation) == ARTICLES


def test_same_seed_same_bytes(shared_data: Path, prepared: Path, tmp_path: Path):
    again = prepare(shared_data, tmp_path / "again")
    assert output_digest(again) == output_digest(prepared)


def test_other_seed_other_split(shared_data: Path, prepared: Path, tmp_path: Path):
    other = prepare(shared_data, tmp_path / "other", "data.seed=1")
    split_of = lambda out: {row["article_id"]: row["split"] for row in read_units(out)}  # noqa: E731
    assert split_of(other) != split_of(prepared)


@pytest.mark.slow
def test_worker_count_does_not_change_bytes(shared_data: Path, prepared: Path, tmp_path: Path):
    parallel = prepare(shared_data, tmp_path / "parallel", "data.num_proc=2")
    assert output_digest(parallel) == output_digest(prepared)


def test_rerun_after_interruption_starts_clean(shared_data: Path, tmp_path: Path):
    out = tmp_path / "data"
    stale = tmp_path / ".data.partial"
    (stale / "units").mkdir(parents=True)
    (stale / "units" / "junk.arrow").write_bytes(b"half written")
    prepare(shared_data, out, "data.max_articles=5")
    first = output_digest(out)

    prepare(shared_data, out, "data.max_articles=5")  # replaces a complete output

    assert not stale.exists()
    assert output_digest(out) == first


def test_foreign_output_directory_rejected(shared_data: Path, tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["prepare-data", "--input", str(shared_data / "dewiki-articles.parquet"), "--out", str(out)])
    assert_one_line_error(result, str(out))
    assert (out / "notes.txt").read_text() == "keep me"


def test_xml_dump_prepares_every_article(shared_data: Path, tmp_path: Path):
    out = prepare(shared_data, tmp_path / "xml", inputs=[shared_data / "dewiki-20170701-sample.xml.bz2"])
    manifest = json.loads((out / "manifest.json").read_text())
    rows = read_units(out)
    assert manifest["articles_read"] == 20
    assert manifest["source"][0]["namespace_0_pages"] == 36
    assert len({row["article_id"] for row in rows}) == 20
    for row in rows:
        for residue in ("{{", "[[", "|}", "<ref"):
            assert residue not in row["text"]


def test_several_inputs_get_distinct_ids(shared_data: Path, tmp_path: Path):
    inputs = [shared_data / "klexikon-articles.parquet", shared_data / "dewiki-articles.parquet"]
    out = prepare(shared_data, tmp_path / "both", "data.max_articles=4", inputs=inputs)
    ids = {row["article_id"] for row in read_units(out)}
    assert ids == {f"klexikon-articles.parquet:{index}" for index in range(4)}


def test_jsonl_and_text_inputs(shared_data: Path, tmp_path: Path):
    import pyarrow.parquet as pq

    rows = pq.read_table(shared_data / "dewiki-articles.parquet").slice(0, 3).to_pylist()
    jsonl = tmp_path / "articles.jsonl"
    jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    text = tmp_path / "Hund.txt"
    text.write_text("Der Hund bellt laut, weil er Hunger hat.\n\nDanach schläft er im Garten ein.", encoding="utf-8")

    out = prepare(shared_data, tmp_path / "mixed", inputs=[jsonl, text])

    units = read_units(out)
    ids = {row["article_id"] for row in units}
    assert ids == {"articles.jsonl:0", "articles.jsonl:1", "articles.jsonl:2", "Hund.txt:0"}
    dog = [row for row in units if row["article_id"] == "Hund.txt:0"]
    assert [row["text"] for row in dog] == ["Der Hund bellt laut, weil er Hunger hat.\n\nDanach schläft er im Garten ein."]
    assert dog[0]["title"] == "Hund"


# ----------------------------------------------------------------------------- units and stages


def test_stage_thresholds_and_assignment():
    scores = np.arange(100, dtype=np.float32)
    thresholds = stage_thresholds(scores, 4)
    assert thresholds.tolist() == [24.75, 49.5, 74.25]
    stages = assign_stages(scores, thresholds)
    assert [int(np.sum(stages == stage)) for stage in "ABCD"] == [25, 25, 25, 25]
    assert assign_stages(np.array([-5.0, 24.75, 1e9], dtype=np.float32), thresholds).tolist() == ["A", "B", "D"]
    assert assign_stages(np.array([3.0], dtype=np.float32), stage_thresholds(scores, 1)).tolist() == ["A"]


def test_cut_paragraph_at_sentence_ends():
    paragraph = "Der erste Satz ist hier. Der zweite Satz folgt. Der dritte Satz endet."
    assert cut_paragraph(paragraph, 50) == ["Der erste Satz ist hier. Der zweite Satz folgt.", "Der dritte Satz endet."]
    assert cut_paragraph(paragraph, 1000) == [paragraph]
    assert cut_paragraph("Einwort " * 10, 20) == ["Einwort Einwort", "Einwort Einwort", "Einwort Einwort", "Einwort Einwort", "Einwort Einwort"]


def test_pack_units_joins_short_paragraphs():
    short, long = "Kurz.", "L" * 30
    assert pack_units([[short], [short], [long]], min_chars=20, max_chars=100) == [f"{short}\n\n{short}\n\n{long}"]
    assert pack_units([[long], [short]], min_chars=20, max_chars=100) == [f"{long}\n\n{short}"]
    assert pack_units([[long], [long]], min_chars=20, max_chars=40) == [long, long]
    assert pack_units([["a" * 30, "b" * 30]], min_chars=50, max_chars=100) == ["a" * 30 + " " + "b" * 30]


# ----------------------------------------------------------------------------- difficulty on real pairs


@pytest.mark.slow
def test_klexikon_scores_below_wikipedia(shared_data: Path):
    """Averaged per article, Klexikon text scores easier than Wikipedia text on the same topic.

    Runs on every fourth title (654 pairs, chosen by id) to stay fast; the figure over all 2,598
    pairs is in docs/benchmarks-data.md.
    """
    from spikewalze_cli.config import DataConfig
    from spikewalze_cli.data.difficulty import Lexicon, count_words, log_rarity_table, score_text
    from spikewalze_cli.data.sources import iter_articles, open_sources
    from spikewalze_cli.data.units import segment_article

    config = DataConfig()
    units: dict[str, dict[str, list[str]]] = {}
    for name in ("dewiki", "klexikon"):
        sources = open_sources(DataConfig(inputs=[str(shared_data / f"{name}-articles.parquet")]))
        units[name] = {}
        for article in iter_articles(sources):
            if int(article.article_id) % 4:
                continue
            _, title, paragraphs = segment_article(article, config.min_paragraph_chars, config.max_unit_chars)
            units[name][title] = pack_units([pieces for _, pieces in paragraphs], config.min_unit_chars, config.max_unit_chars)

    counts = count_words(text for by_title in units.values() for texts in by_title.values() for text in texts)
    lexicon = Lexicon(*log_rarity_table(counts, sum(counts.values())))
    mean_score = {
        name: {title: float(np.mean([score_text(text, lexicon)[0] for text in texts])) for title, texts in by_title.items() if texts}
        for name, by_title in units.items()
    }
    titles = sorted(set(mean_score["dewiki"]) & set(mean_score["klexikon"]))
    easier = sum(mean_score["klexikon"][title] < mean_score["dewiki"][title] for title in titles)
    print(f"Klexikon easier in {easier} of {len(titles)} pairs ({easier / len(titles):.1%})")
    assert len(titles) >= 600
    assert easier / len(titles) >= 0.9


# ----------------------------------------------------------------------------- bad input


def assert_one_line_error(result, *fragments: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_bad_input(kind: str, directory: Path, shared_data: Path) -> tuple[Path, str]:
    """Write one kind of broken input; return its path and a fragment the error must contain."""
    if kind == "missing":
        return directory / "nowhere.parquet", "not found"
    if kind == "unknown type":
        path = directory / "articles.csv"
        path.write_text("id,text\n1,Hallo\n")
        return path, "unknown input file type"
    if kind == "empty text":
        path = directory / "leer.txt"
        path.write_text("\n\n  \n")
        return path, "no usable text"
    if kind == "not utf-8 text":
        path = directory / "latin1.txt"
        path.write_bytes("Größe und Maße".encode("latin-1"))
        return path, "UTF-8"
    if kind == "not utf-8 jsonl":
        path = directory / "latin1.jsonl"
        path.write_bytes(('{"id": "1", "title": "T", "text": "' + "Größe " * 20 + '"}\n').encode("latin-1"))
        return path, "UTF-8"
    if kind == "jsonl without text":
        path = directory / "notext.jsonl"
        path.write_text('{"id": "1", "title": "T", "body": "Hallo Welt"}\n')
        return path, "'text'"
    if kind == "parquet without text":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "notext.parquet"
        pq.write_table(pa.table({"id": ["1"], "body": ["Hallo"]}), path)
        return path, "no 'text' column"
    if kind == "truncated bz2":
        path = directory / "cut.xml.bz2"
        data = (shared_data / "dewiki-20170701-sample.xml.bz2").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated"
    if kind == "malformed xml":
        path = directory / "broken.xml"
        path.write_text("<mediawiki><page><title>A</title><ns>0</ns><id>1</id><revision><text>Hallo</revision></page>")
        return path, "malformed XML"
    raise AssertionError(kind)


BAD_INPUTS = [
    "missing",
    "unknown type",
    "empty text",
    "not utf-8 text",
    "not utf-8 jsonl",
    "jsonl without text",
    "parquet without text",
    "truncated bz2",
    "malformed xml",
]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_one_line_nothing_written(kind: str, shared_data: Path, tmp_path: Path):
    path, fragment = write_bad_input(kind, tmp_path, shared_data)
    out = tmp_path / "data"

    result = CliRunner().invoke(app, ["prepare-data", "--input", str(path), "--out", str(out), "--set", "data.num_proc=1"])

    assert_one_line_error(result, fragment)
    assert not out.exists()
    assert not (tmp_path / ".data.partial").exists()


def test_prepare_keeps_foreign_manifest_directory(tmp_path: Path, shared_data: Path):
    """A tokenizer or checkpoint directory also has a manifest.json; prepare-data must not replace it."""
    target = tmp_path / "tokenizer"
    target.mkdir()
    (target / "manifest.json").write_text('{"format": 1}', encoding="utf-8")
    (target / "tokenizer.json").write_text("{}", encoding="utf-8")
    config = load_config(None, [f"data.inputs=['{shared_data / 'klexikon-articles.parquet'}']", "data.max_articles=5", f"data.out='{target}'"])

    with pytest.raises(UserError, match="is not empty and contains no prepared data"):
        prepare_data(config)

    assert (target / "tokenizer.json").read_text(encoding="utf-8") == "{}"
