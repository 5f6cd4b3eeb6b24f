"""Wikitext to plain text with mwparserfromhell.

Dropped: templates, tables, references, comments, file and image links, category and
interlanguage links, and tags whose content is not prose (math, gallery, timeline, ...).
Kept: plain text, link labels (or the target when a link has no label), headings as their own
paragraphs, list items as lines, and the content of formatting tags (bold, italic, span, ...).
"""

from __future__ import annotations

import html
import re

import mwparserfromhell
from mwparserfromhell.nodes import (
    Argument,
    Comment,
    ExternalLink,
    Heading,
    HTMLEntity,
    Tag,
    Template,
    Text,
    Wikilink,
)
from mwparserfromhell.wikicode import Wikicode

# Link prefixes of German and English wikis whose links are not part of the prose.
HIDDEN_LINK_PREFIXES = frozenset({"datei", "file", "bild", "image", "media", "medium", "kategorie", "category"})

# Tags whose content is not prose, or is markup that would leak brackets into the text.
DROPPED_TAGS = frozenset(
    {
        "ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap", "score",
        "syntaxhighlight", "source", "pre", "nowiki", "templatedata", "graph", "mapframe", "maplink",
        "hiero", "includeonly", "noinclude", "onlyinclude", "inputbox", "categorytree", "code",
    }
)

COMMENT_RE = re.compile(r"<!--.*?-->", re.DOTALL)
REFERENCE_RE = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
TEMPLATE_BRACES_RE = re.compile(r"\{\{|\}\}")
TABLE_MARKERS_RE = re.compile(r"^[ \t:]*(\{\||\|\})", re.MULTILINE)
INTERLANGUAGE_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?$")
MARKUP_RESIDUE_RE = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}|<ref[^>]*>?|</ref>|__[A-Z]+__")
BLANK_LINES_RE = re.compile(r"\n\s*\n\s*")
SPACES_RE = re.compile(r"[ \t\u00a0]+")


def _remove_nested(text: str, pattern: re.Pattern, opener: str) -> str:
    """Remove balanced blocks whose open and close markers `pattern` finds (templates, tables).

    An opener that is never closed is left in place for the parser, so no text after it is lost.
    """
    pieces = []
    depth = 0
    kept_from = block_start = 0
    for match in pattern.finditer(text):
        if match.group(match.lastindex or 0) == opener:
            if depth == 0:
                block_start = match.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                pieces.append(text[kept_from:block_start])
                kept_from = match.end()
    pieces.append(text[kept_from:])
    return "".join(pieces)


def _drop_blocks(wikitext: str) -> str:
    """Delete comments, references, templates and tables before parsing.

    The renderer would drop them anyway, and mwparserfromhell spends most of its time on them
    (templates above all), so deleting them first makes cleaning several times faster.
    """
    text = COMMENT_RE.sub("", wikitext)
    text = REFERENCE_RE.sub("", text)
    text = _remove_nested(text, TEMPLATE_BRACES_RE, "{{")
    return _remove_nested(text, TABLE_MARKERS_RE, "{|")


def _hidden_link(title: str) -> bool:
    title = title.strip().lstrip(":")
    prefix, colon, _ = title.partition(":")
    if not colon:
        return False
    prefix = prefix.strip().lower()
    return prefix in HIDDEN_LINK_PREFIXES or bool(INTERLANGUAGE_RE.match(prefix))


def _render(code: Wikicode, parts: list[str]) -> None:
    """Append the plain text of `code` to `parts`."""
    for node in code.nodes:
        if isinstance(node, Text):
            parts.append(node.value)
        elif isinstance(node, Wikilink):
            title = str(node.title)
            if _hidden_link(title):
                continue
            if node.text is not None:
                _render(node.text, parts)
            else:
                # The title of a bare link is raw text, so entities such as &nbsp; are still escaped.
                parts.append(html.unescape(title.lstrip(":").split("#", 1)[0]))
        elif isinstance(node, Heading):
            parts.append("\n\n")
            _render(node.title, parts)
            parts.append("\n\n")
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag in DROPPED_TAGS:
                continue
            if tag == "br":
                parts.append("\n")
            elif node.contents is not None and not node.self_closing:
                _render(node.contents, parts)
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                _render(node.title, parts)
        elif isinstance(node, HTMLEntity):
            try:
                parts.append(node.normalize())
            except ValueError:
                continue
        elif isinstance(node, (Template, Comment, Argument)):
            continue
        # Any other node kind carries no prose.


def _tidy(text: str) -> str:
    """Remove markup that survived parsing, trim lines and keep one blank line between paragraphs."""
    for _ in range(8):
        cleaned = MARKUP_RESIDUE_RE.sub("", text)
        if cleaned == text:
            break
        text = cleaned
    lines = [SPACES_RE.sub(" ", line).strip() for line in text.split("\n")]
    # Keep blank lines (paragraph breaks) and lines with more than list or table punctuation.
    text = "\n".join(line for line in lines if not line or line.strip("*#:;|!-=,. "))
    return BLANK_LINES_RE.sub("\n\n", text).strip()


# NOTE: mwparserfromhell's parse is the bottleneck of the XML dump path, at about 2 to 4 MB of
# wikitext per CPU second even after `_drop_blocks` (see docs/benchmarks-data.md).
def wikitext_to_text(wikitext: str) -> str:
    """Return the plain text of a wikitext article, paragraphs separated by a blank line.

    Never raises for str input: text that the parser rejects is kept with its markup removed by
    pattern, which is cruder but still free of template and link brackets.
    """
    try:
        parts: list[str] = []
        _render(mwparserfromhell.parse(_drop_blocks(wikitext), skip_style_tags=False), parts)
        text = "".join(parts)
    except Exception:  # noqa: BLE001 - the parser's own errors must not stop a corpus run
        text = wikitext
    return _tidy(text)
