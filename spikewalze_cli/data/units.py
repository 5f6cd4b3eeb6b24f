"""Paragraphs and training units: the text-only steps between a cleaned article and scoring.

Each step is a pure function of its inputs, so worker processes can run them in any order and the
main process still gets the same units.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

from spikewalze_cli.data.difficulty import WORD_RE, sentence_ends
from spikewalze_cli.data.sources import Article
from spikewalze_cli.data.wikitext import wikitext_to_text

PARAGRAPH_BREAK_RE = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def paragraph_hash(paragraph: str) -> int:
    """Return a 64-bit content hash, stable across processes and runs (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(paragraph.encode("utf-8"), digest_size=8).digest(), "little")


def split_paragraphs(text: str, min_chars: int) -> list[str]:
    """Split NFC text at blank lines; drop paragraphs shorter than `min_chars` or without a word."""
    paragraphs = []
    for block in PARAGRAPH_BREAK_RE.split(text.replace("\r\n", "\n").strip()):
        block = block.strip()
        if len(block) >= min_chars and WORD_RE.search(block):
            paragraphs.append(block)
    return paragraphs


def cut_paragraph(paragraph: str, max_chars: int) -> list[str]:
    """Cut a paragraph into pieces of at most `max_chars`, at sentence ends where possible.

    A single sentence longer than `max_chars` is cut at the last space before the limit, or at the
    limit itself when it has no space there.
    """
    if len(paragraph) <= max_chars:
        return [paragraph]

    sentences = []
    start = 0
    for end in [*sentence_ends(paragraph), len(paragraph)]:
        sentence = paragraph[start:end].strip()
        start = end
        # Walk an offset through a long sentence instead of slicing off its rest, so that cutting
        # a sentence of n characters costs O(n), not O(n^2 / max_chars).
        offset = 0
        while len(sentence) - offset > max_chars:
            cut = sentence.rfind(" ", offset, offset + max_chars + 1)
            cut = cut if cut > offset else offset + max_chars
            sentences.append(sentence[offset:cut].strip())
            offset = cut
            while offset < len(sentence) and sentence[offset].isspace():
                offset += 1
        if offset < len(sentence):
            sentences.append(sentence[offset:])

    pieces: list[str] = []
    current = ""
    for sentence in sentences:
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


def segment_article(article: Article, min_paragraph_chars: int, max_unit_chars: int) -> tuple[str, str, list[tuple[int, list[str]]]]:
    """Clean one article and return (article_id, title, [(paragraph hash, pieces)])."""
    text = wikitext_to_text(article.text) if article.is_wikitext else article.text
    text = unicodedata.normalize("NFC", text)
    title = unicodedata.normalize("NFC", article.title)
    paragraphs = split_paragraphs(text, min_paragraph_chars)
    return article.article_id, title, [(paragraph_hash(p), cut_paragraph(p, max_unit_chars)) for p in paragraphs]


def pack_units(paragraphs: list[list[str]], min_chars: int, max_chars: int) -> list[str]:
    """Join the pieces of an article's paragraphs into units of about `min_chars` to `max_chars`.

    Pieces are added in order until a unit reaches `min_chars`; a piece that would push the unit
    past `max_chars` starts a new one. Paragraphs are joined by a blank line, pieces of one cut
    paragraph by a space. A short remainder at the end joins the previous unit when it fits.
    """
    units: list[str] = []
    current = ""
    for pieces in paragraphs:
        for index, piece in enumerate(pieces):
            separator = " " if index > 0 else "\n\n"
            if current and len(current) + len(separator) + len(piece) > max_chars:
                units.append(current)
                current = ""
            current = f"{current}{separator}{piece}" if current else piece
            if len(current) >= min_chars:
                units.append(current)
                current = ""
    if current:
        if units and len(units[-1]) + 2 + len(current) <= max_chars:
            units[-1] = f"{units[-1]}\n\n{current}"
        else:
            units.append(current)
    return units


def split_position(article_id: str, seed: int) -> float:
    """Return a number in [0, 1) fixed by the article id and seed; below the validation share means validation."""
    digest = hashlib.blake2b(f"{seed}\x00{article_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class SeenParagraphs:
    """Exact-duplicate detection over 64-bit paragraph hashes.

    New hashes collect in a set; every `merge_every` of them are merged into one sorted uint64
    array, so the corpus-wide memory is about 8 bytes per distinct paragraph.
    NOTE: that is still linear in the corpus (about 0.3 GB for the full German Wikipedia).
    """

    def __init__(self, merge_every: int = 1 << 20) -> None:
        self.sorted = np.empty(0, dtype=np.uint64)
        self.recent: set[int] = set()
        self.merge_every = merge_every

    def add(self, value: int) -> bool:
        """Record `value`; return True when it was new."""
        if value in self.recent:
            return False
        if len(self.sorted):
            index = np.searchsorted(self.sorted, np.uint64(value))
            if index < len(self.sorted) and self.sorted[index] == np.uint64(value):
                return False
        self.recent.add(value)
        if len(self.recent) >= self.merge_every:
            merged = np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent))
            self.sorted = np.union1d(self.sorted, merged)
            self.recent.clear()
        return True
