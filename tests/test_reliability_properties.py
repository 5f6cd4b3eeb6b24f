"""Property tests of the path from an article to training units, for any input text.

The cleaner, the difficulty features and the tokenizer round trip have their own property tests
(test_data_wikitext.py, test_data_difficulty.py, test_tokenizer.py). These cover the steps in
between: cutting paragraphs and packing units, on wikitext and on plain text.
"""

from __future__ import annotations

import math
import re
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from spikewalze_cli.data.difficulty import score_text
from spikewalze_cli.data.sources import Article
from spikewalze_cli.data.units import cut_paragraph, pack_units, segment_article

WIKITEXT_PIECES = [
    *"{}[]|=<>/'!*#:;&-\n .,?",
    "Aachen", "liegt", "im", "Westen", "Straße", "ÄÖÜ", "z. B.", "Dr.", "17.", "\n\n",
    "[[", "]]", "{{", "}}", "<ref>", "</ref>", "[[Datei:", "[[Kategorie:", "&amp;", "<!--", "-->", "== Titel ==",
]
WIKITEXT = st.lists(st.sampled_from(WIKITEXT_PIECES), max_size=120).map("".join) | st.text(max_size=400)
MARKUP = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref")


def words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


@settings(max_examples=300, deadline=None)
@given(paragraph=st.text(alphabet=st.sampled_from(list("ab .!?\n\tÄ")), max_size=400), max_chars=st.integers(1, 60))
def test_cut_paragraph_bounds_and_keeps_text(paragraph: str, max_chars: int):
    pieces = cut_paragraph(paragraph, max_chars)

    if len(paragraph) <= max_chars:
        assert pieces == [paragraph]
        return
    assert all(0 < len(piece) <= max_chars for piece in pieces)
    # Cuts fall at spaces or inside over-long words, so the non-space characters stay in order.
    assert "".join(words(" ".join(pieces))) == "".join(words(paragraph))


@settings(max_examples=300, deadline=None)
@given(wikitext=WIKITEXT, is_wikitext=st.booleans(), min_chars=st.integers(1, 300), max_extra=st.integers(0, 300))
def test_units_of_any_article(wikitext: str, is_wikitext: bool, min_chars: int, max_extra: int):
    max_chars = max(min_chars + max_extra, 64)

    _, _, paragraphs = segment_article(Article("1", "Titel", wikitext, is_wikitext=is_wikitext), 1, max_chars)
    units = pack_units([pieces for _, pieces in paragraphs], min_chars, max_chars)

    for unit in units:
        assert 0 < len(unit) <= max_chars
        assert unit == unicodedata.normalize("NFC", unit)
        unit.encode("utf-8")  # no lone surrogates
        assert unit == unit.strip()
        score, features = score_text(unit)
        assert math.isfinite(score)
        assert all(math.isfinite(value) for value in features.values())
        if is_wikitext:
            assert not any(residue in unit for residue in MARKUP), unit
