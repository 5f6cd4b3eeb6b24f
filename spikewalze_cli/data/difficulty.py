"""German text difficulty: readability features per unit and one combined score.

Counting rules (every feature is computed from these counts):

- A word is a run of letters, optionally joined by hyphens or apostrophes ("Anni-Frid" is one
  word). Numbers and symbols are not words. Word length counts letters only.
- A sentence ends at ".", "!", "?" or "…" followed by whitespace and an upper-case letter, a
  digit or an opening quote, except after a known abbreviation ("z. B.", "Dr."), a single letter
  (an initial) or a number of one or two digits (German ordinals: "am 17. Juli"). A text with
  words has at least one sentence.
- Syllables are vowel nuclei: a single vowel, or one of the diphthongs and long vowels
  ai, au, äu, ei, eu, ey, ay, ie, aa, ee, oo; "qu" counts its "u" as a consonant, and a final
  "-ien(s)" after another syllable counts as two ("Spa-ni-en"). Every word has at least one.
  `tests/test_data_difficulty.py` checks this counter against the pyphen de_DE hyphenation
  dictionary on real Wikipedia words; `count_syllables_pyphen` is that reference.

Features (one float column each in the prepared data):

- `sentence_length`: words per sentence (ASL).
- `word_length`: letters per word.
- `syllables_per_word`: ASW.
- `flesch_amstad`: Flesch reading ease adapted to German by Amstad (1978):
  FRE = 180 - ASL - 58.5 * ASW. Higher is easier (0 to 100 for most texts).
- `wiener_sachtext`: first Wiener Sachtextformel (Bamberger and Vanecek, 1984):
  WSTF1 = 0.1935 * MS + 0.1672 * SL + 0.1297 * IW - 0.0327 * ES - 0.875, with MS the percentage
  of words with three or more syllables, SL the mean sentence length in words, IW the percentage of
  words with more than six letters and ES the percentage of one-syllable words. It estimates a
  school grade, roughly 4 (easy) to 15 (very hard).
- `long_word_share`: share of words with more than six letters, 0 to 1.
- `rarity`: mean over words of -log10 of the word's relative frequency in the whole prepared
  corpus (lower-cased), with frequencies below 1e-8 counted as 1e-8, so at most 8.
- `subordinate_markers`: subordinating conjunctions (dass, weil, obwohl, wenn, als, ob, damit,
  nachdem, während, ...) plus relative pronouns right after a comma (", die", ", in dem"), per
  sentence.
- `comma_density`: commas per 100 words.

Combined score (higher is harder): the mean of the nine features after standardising each one
with a fixed reference mean and spread and flipping the sign of Flesch-Amstad, which grows as text
gets easier. The reference values (`REFERENCE`) are unit-level means and standard deviations
measured on German Wikipedia. Fixed references keep a unit's score independent of the other units,
apart from the rarity feature, so scores from different runs are comparable.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

FEATURES = (
    "sentence_length",
    "word_length",
    "syllables_per_word",
    "flesch_amstad",
    "wiener_sachtext",
    "long_word_share",
    "rarity",
    "subordinate_markers",
    "comma_density",
)

# (mean, standard deviation, direction): direction +1 when a larger value means harder text.
# Unit-level means and standard deviations measured once on a 2,598-article sample of German
# Wikipedia (90 MB of text, default unit sizes), rounded. NOTE: the rarity reference depends on the
# corpus size, because larger corpora give rare words lower frequencies; remeasure after changing
# a feature definition.
REFERENCE: dict[str, tuple[float, float, float]] = {
    "sentence_length": (20.4, 7.9, 1.0),
    "word_length": (6.36, 0.65, 1.0),
    "syllables_per_word": (2.16, 0.23, 1.0),
    "flesch_amstad": (33.2, 15.8, -1.0),
    "wiener_sachtext": (12.4, 2.8, 1.0),
    "long_word_share": (0.39, 0.072, 1.0),
    "rarity": (3.65, 0.24, 1.0),
    "subordinate_markers": (0.72, 0.71, 1.0),
    "comma_density": (5.5, 4.2, 1.0),
}

RARITY_FLOOR = 1e-8

WORD_RE = re.compile(r"[^\W\d_]+(?:[-'’][^\W\d_]+)*")

SENTENCE_END_RE = re.compile(r"[.!?…]+[\"'»«“”‘’)\]]*\s+(?=[\"'„»«“‘(\[]?[A-ZÄÖÜ0-9])")

ABBREVIATIONS = frozenset(
    """
    abb abs abt adj akad allg anm art aufl bd bearb bes best betr bspw bzw ca chr dgl di dipl dr
    ebd ehem em engl etc ev evtl exkl fa fam ff fr frz geb gegr gem ges gest gr ggf hl hr hrsg
    ing inkl insb jh jr jun kath kap kfz lat lt max mio mind mrd mr mrs nachf nr od orig prof
    ps rd resp röm sen sog spätlat st std str tab tel urspr usw verh vgl vs wg zb zt zzt
    """.split()
)

CONJUNCTIONS = frozenset(
    """
    dass daß weil obwohl obgleich obschon wenn als ob damit nachdem während bevor ehe seit seitdem
    sobald solange sofern soweit falls indem sodass wohingegen wobei weshalb weswegen wodurch
    worauf womit wonach wogegen wofür worin
    """.split()
)

RELATIVE_AFTER_COMMA_RE = re.compile(
    r",\s+(?:(?:in|an|auf|aus|bei|mit|nach|von|vor|zu|über|unter|für|durch|gegen|ohne|um|zwischen|neben|hinter|seit|während|wegen|trotz)\s+)?(?:der|die|das|dem|den|denen|deren|dessen|welche|welcher|welches|welchem|welchen)\b"
)

NUCLEUS_RE = re.compile(r"äu|ai|au|ei|eu|ey|ay|ie|aa|ee|oo|[aeiouyäöü]")


@lru_cache(maxsize=1 << 18)
def count_syllables(word: str) -> int:
    """Count the syllables of one word by its vowel nuclei (see the module docstring)."""
    lower = word.lower().replace("qu", "qw")
    count = len(NUCLEUS_RE.findall(lower))
    if count >= 2 and (lower.endswith("ien") or lower.endswith("iens")):
        count += 1
    return max(count, 1)


_PYPHEN = None


def count_syllables_pyphen(word: str) -> int:
    """Count syllables as the pieces with a vowel that pyphen's de_DE hyphenation produces."""
    global _PYPHEN
    if _PYPHEN is None:
        import pyphen

        _PYPHEN = pyphen.Pyphen(lang="de_DE", left=1, right=1)
    pieces = _PYPHEN.inserted(word, hyphen="\x00").split("\x00")
    return max(sum(1 for piece in pieces if NUCLEUS_RE.search(piece.lower())), 1)


def words_of(text: str) -> list[str]:
    return WORD_RE.findall(text)


def sentence_ends(text: str) -> list[int]:
    """Return the offsets just past each sentence-final punctuation run, the last sentence excluded."""
    ends = []
    for match in SENTENCE_END_RE.finditer(text):
        end = match.start()
        if text[end] == ".":
            start = max(text.rfind(" ", 0, end), text.rfind("\n", 0, end)) + 1
            token = text[start:end].lower().rsplit(".", 1)[-1].lstrip("(\"'„»")
            if token in ABBREVIATIONS or (len(token) == 1 and token.isalpha()):
                continue
            if token.isdigit() and len(token) <= 2:
                continue
        ends.append(match.end())
    return ends


def count_sentences(text: str) -> int:
    """Count sentences; a text that contains a word is at least one sentence."""
    return len(sentence_ends(text)) + 1 if WORD_RE.search(text) else 0


@dataclass(frozen=True)
class TextCounts:
    """Raw counts of one text from which every feature follows."""

    words: int
    sentences: int
    letters: int
    syllables: int
    long_words: int  # more than six letters
    polysyllables: int  # three or more syllables
    monosyllables: int
    commas: int
    markers: int
    rarity_sum: float  # sum over words of -log10 relative frequency


class Lexicon:
    """Per-word statistics plus the corpus rarity table, with a cache per distinct word.

    Word frequencies are Zipfian, so a few thousand cached words cover most tokens and scoring
    costs about one dictionary lookup per word. `log_rarity` maps a lower-cased word to -log10 of
    its relative corpus frequency; words missing from it get `unseen`. Without a table every
    word's rarity is 0.
    """

    def __init__(self, log_rarity: Mapping[str, float] | None = None, unseen: float = 0.0, max_cache: int = 1 << 17) -> None:
        self.log_rarity = log_rarity if log_rarity is not None else {}
        self.unseen = unseen if log_rarity is not None else 0.0
        self.max_cache = max_cache
        self.cache: dict[str, tuple[int, int, int, int, int, int, float]] = {}

    def word_stats(self, word: str) -> tuple[int, int, int, int, int, int, float]:
        """Return (letters, syllables, long, polysyllabic, monosyllabic, conjunction, rarity) for one word."""
        stats = self.cache.get(word)
        if stats is None:
            lower = word.lower()
            letters = len(word) - word.count("-") - word.count("'") - word.count("’")
            syllables = count_syllables(word)
            stats = (
                letters,
                syllables,
                int(letters > 6),
                int(syllables >= 3),
                int(syllables == 1),
                int(lower in CONJUNCTIONS),
                self.log_rarity.get(lower, self.unseen),
            )
            if len(self.cache) >= self.max_cache:
                self.cache.clear()
            self.cache[word] = stats
        return stats

    def count(self, text: str) -> TextCounts:
        """Count words, sentences, syllables and the rest for one text."""
        words = WORD_RE.findall(text)
        cache_get = self.cache.get
        rows = [cache_get(word) or self.word_stats(word) for word in words]
        if rows:
            letters, syllables, long_words, polysyllables, monosyllables, conjunctions, rarity = map(sum, zip(*rows))
        else:
            letters = syllables = long_words = polysyllables = monosyllables = conjunctions = rarity = 0
        return TextCounts(
            words=len(words),
            sentences=count_sentences(text),
            letters=letters,
            syllables=syllables,
            long_words=long_words,
            polysyllables=polysyllables,
            monosyllables=monosyllables,
            commas=text.count(","),
            markers=conjunctions + len(RELATIVE_AFTER_COMMA_RE.findall(text)),
            rarity_sum=float(rarity),
        )


def count_text(text: str, lexicon: Lexicon | None = None) -> TextCounts:
    """Count one text; without a lexicon every word's rarity is 0."""
    return (lexicon or Lexicon()).count(text)


def features_from_counts(counts: TextCounts) -> dict[str, float]:
    """Turn raw counts into the nine features; a text without words gets all zeros."""
    if counts.words == 0:
        return dict.fromkeys(FEATURES, 0.0)

    words = counts.words
    sentences = max(counts.sentences, 1)
    asl = words / sentences
    asw = counts.syllables / words
    percent = 100.0 / words
    return {
        "sentence_length": asl,
        "word_length": counts.letters / words,
        "syllables_per_word": asw,
        "flesch_amstad": 180.0 - asl - 58.5 * asw,
        "wiener_sachtext": 0.1935 * counts.polysyllables * percent
        + 0.1672 * asl
        + 0.1297 * counts.long_words * percent
        - 0.0327 * counts.monosyllables * percent
        - 0.875,
        "long_word_share": counts.long_words / words,
        "rarity": counts.rarity_sum / words,
        "subordinate_markers": counts.markers / sentences,
        "comma_density": counts.commas * percent,
    }


def combined_score(features: Mapping[str, float]) -> float:
    """Return the mean standardised feature value, signed so that higher is harder."""
    total = 0.0
    for name, (mean, spread, direction) in REFERENCE.items():
        total += direction * (features[name] - mean) / spread
    return total / len(REFERENCE)


def score_text(text: str, lexicon: Lexicon | None = None) -> tuple[float, dict[str, float]]:
    """Return (score, features) for one text."""
    features = features_from_counts(count_text(text, lexicon))
    return combined_score(features), features


def count_words(texts: Iterable[str]) -> Counter:
    """Count lower-cased words over `texts` (the corpus frequencies behind `rarity`)."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(map(str.lower, WORD_RE.findall(text)))
    return counts


def log_rarity_table(counts: Mapping[str, int], total: int) -> tuple[dict[str, float], float]:
    """Return ({word: -log10 relative frequency}, value for unseen words) from corpus counts.

    `total` is the number of word tokens counted, which can exceed sum(counts) after pruning.
    """
    total = max(total, 1)
    floor = -math.log10(RARITY_FLOOR)
    table = {word: min(-math.log10(count / total), floor) for word, count in counts.items()}
    unseen = min(-math.log10(0.5 / total), floor)
    return table, unseen
