"""The wikitext cleaner and the MediaWiki XML source on hand-written markup and the real dump excerpt."""

from __future__ import annotations

import bz2

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spikewalze_cli.config import DataConfig
from spikewalze_cli.data.sources import iter_articles, open_sources
from spikewalze_cli.data.wikitext import wikitext_to_text

RESIDUE = ("{{", "}}", "[[", "]]", "|}", "{|", "<ref")

ARTICLE = """{{Infobox Stadt
| Name = Aachen
}}
'''Aachen''' ist eine [[Großstadt]] in [[Nordrhein-Westfalen|NRW]].<ref>{{Literatur|Titel=Quelle}}</ref>
[[Datei:Aachen Dom.jpg|mini|Der [[Aachener Dom|Dom]]]]

== Geschichte ==
Die Stadt wurde <!-- unsicher --> von den Römern gegründet.<ref name="a" />

{| class="wikitable"
| Zelle || Wert
|}
* Erster Punkt mit [https://example.org Link]
* Zweiter Punkt &amp; mehr

[[Kategorie:Ort in Nordrhein-Westfalen]]
[[en:Aachen]]
"""


def test_cleaner_keeps_prose_and_drops_markup():
    text = wikitext_to_text(ARTICLE)
    paragraphs = text.split("\n\n")
    assert paragraphs[0] == "Aachen ist eine Großstadt in NRW."
    assert "Geschichte" in paragraphs
    assert "Die Stadt wurde von den Römern gegründet." in text
    assert "Erster Punkt mit Link\nZweiter Punkt & mehr" in text
    for dropped in ("Infobox", "Literatur", "Quelle", "Datei", "Dom", "Zelle", "Kategorie", "unsicher", "en:"):
        assert dropped not in text, dropped
    for residue in RESIDUE:
        assert residue not in text


def test_cleaner_link_without_label_keeps_target():
    assert wikitext_to_text("Er lebte in [[Berlin#Geschichte]].") == "Er lebte in Berlin."


def test_cleaner_removes_unbalanced_brackets():
    text = wikitext_to_text("Text [[kaputt und {{offen ohne Ende")
    for residue in RESIDUE:
        assert residue not in text
    assert "Text" in text


MARKUP_PIECES = [*"{}[]|=<>/'!*#:;&-\n abcäöüß", "ref", "<ref>", "</ref>", "Datei:", "&amp;", "<!--", "-->"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(MARKUP_PIECES), max_size=60).map("".join) | st.text(max_size=200))
def test_cleaner_never_raises_and_leaves_no_markup(wikitext):
    text = wikitext_to_text(wikitext)
    text.encode("utf-8")  # valid UTF-8: no lone surrogates
    for residue in RESIDUE:
        assert residue not in text


def test_xml_excerpt_articles(shared_data):
    """The excerpt has 36 namespace-0 pages; 16 are redirects, so 20 articles remain."""
    sources = open_sources(DataConfig(inputs=[str(shared_data / "dewiki-20170701-sample.xml.bz2")]))
    articles = list(iter_articles(sources))
    stats = sources[0].stats
    assert stats["pages"] == 79
    assert stats["namespace_0_pages"] == 36
    assert stats["redirects_skipped"] == 16
    assert len(articles) == 20
    assert len({article.article_id for article in articles}) == 20
    assert "Jutta Hoffmann" in {article.title for article in articles}

    for article in articles:
        text = wikitext_to_text(article.text)
        assert len(text) > 100, article.title
        for residue in RESIDUE:
            assert residue not in text, (article.title, residue)
        assert "#WEITERLEITUNG" not in text
    hoffmann = next(article for article in articles if article.title == "Jutta Hoffmann")
    assert wikitext_to_text(hoffmann.text).startswith("Jutta Hoffmann (* 3. März 1941 in Ammendorf bei Halle an der Saale)")


def test_xml_max_articles_stops_early(shared_data):
    sources = open_sources(DataConfig(inputs=[str(shared_data / "dewiki-20170701-sample.xml.bz2")]))
    assert len(list(iter_articles(sources, max_articles=3))) == 3
    assert sources[0].stats["articles"] == 3


def test_bare_link_title_entities_decoded():
    text = wikitext_to_text("Sohn von [[Meinhard&nbsp;II.]] und [[Benedikt&nbsp;XII.]].")
    assert text == "Sohn von Meinhard II. und Benedikt XII.."
    assert "&nbsp;" not in text
