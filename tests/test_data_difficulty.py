"""Difficulty features on hand-written German sentences, the syllable counter and the score."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spikewalze_cli.data.difficulty import (
    FEATURES,
    Lexicon,
    combined_score,
    count_sentences,
    count_syllables,
    count_syllables_pyphen,
    count_text,
    count_words,
    features_from_counts,
    log_rarity_table,
    score_text,
    sentence_ends,
)

SIMPLE = "Der Hund bellt laut."
COMPLEX = "Obwohl es regnete, gingen die Kinder, die keine Schirme hatten, nach Hause."


def test_counts_of_simple_sentence():
    counts = count_text(SIMPLE)
    assert counts.words == 4
    assert counts.sentences == 1
    assert counts.letters == 16
    assert counts.syllables == 4
    assert counts.long_words == 0
    assert counts.monosyllables == 4
    assert counts.polysyllables == 0
    assert counts.commas == 0
    assert counts.markers == 0


def test_features_of_simple_sentence():
    features = features_from_counts(count_text(SIMPLE))
    assert features["sentence_length"] == 4.0
    assert features["word_length"] == 4.0
    assert features["syllables_per_word"] == 1.0
    assert features["flesch_amstad"] == pytest.approx(180 - 4 - 58.5)
    assert features["wiener_sachtext"] == pytest.approx(0.1672 * 4 - 0.0327 * 100 - 0.875)
    assert features["long_word_share"] == 0.0
    assert features["subordinate_markers"] == 0.0
    assert features["comma_density"] == 0.0


def test_counts_of_complex_sentence():
    counts = count_text(COMPLEX)
    assert counts.words == 12
    assert counts.sentences == 1
    assert counts.letters == 60
    # Ob-wohl es reg-ne-te gin-gen die Kin-der die kei-ne Schir-me hat-ten nach Hau-se
    assert counts.syllables == 21
    assert counts.long_words == 2  # regnete, Schirme
    assert counts.polysyllables == 1  # regnete
    assert counts.monosyllables == 4  # es, die, die, nach
    assert counts.commas == 3
    assert counts.markers == 2  # "Obwohl" and the relative clause ", die keine"


def test_features_of_complex_sentence():
    features = features_from_counts(count_text(COMPLEX))
    assert features["sentence_length"] == 12.0
    assert features["word_length"] == 5.0
    assert features["syllables_per_word"] == pytest.approx(21 / 12)
    assert features["flesch_amstad"] == pytest.approx(180 - 12 - 58.5 * 21 / 12)
    expected_wstf = 0.1935 * 100 / 12 + 0.1672 * 12 + 0.1297 * 200 / 12 - 0.0327 * 400 / 12 - 0.875
    assert features["wiener_sachtext"] == pytest.approx(expected_wstf)
    assert features["long_word_share"] == pytest.approx(2 / 12)
    assert features["subordinate_markers"] == 2.0
    assert features["comma_density"] == pytest.approx(25.0)


def test_complex_sentence_scores_harder():
    assert score_text(COMPLEX)[0] > score_text(SIMPLE)[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Am 17. Juli 802 wurde die Kirche geweiht. Sie steht z. B. in Aachen. Dr. Müller kam!", 3),
        ("Er wurde 1972 geboren. Danach zog er nach Rom.", 2),
        ("Was tun? „Nichts“, sagte er.", 2),
        ("Das war im 19. Jahrhundert so. Ludwig kam u. a. mit J. S. Bach.", 2),
        ("1972 1973", 0),
        ("Ein Satz ohne Punkt", 1),
    ],
)
def test_sentence_count(text, expected):
    assert count_sentences(text) == expected


def test_sentence_ends_offsets():
    text = "Er kam. Sie ging."
    assert sentence_ends(text) == [8]


@pytest.mark.parametrize(
    ("word", "syllables"),
    [
        ("Hund", 1),
        ("schien", 1),
        ("Feuer", 2),
        ("Bäume", 2),
        ("Idee", 2),
        ("Quelle", 2),
        ("Theater", 3),
        ("Aachener", 3),
        ("Kirchweihe", 3),
        ("Spanien", 3),
        ("Familien", 4),
        ("Universität", 5),
        ("CDU", 1),
    ],
)
def test_syllable_counter_words(word, syllables):
    assert count_syllables(word) == syllables


def test_syllable_counter_agrees_with_pyphen(shared_data):
    """On real Wikipedia words the fast counter matches pyphen's de_DE hyphenation closely."""
    import pyarrow.parquet as pq

    texts = pq.read_table(shared_data / "dewiki-articles.parquet", columns=["text"]).column("text")
    counts = count_words(texts[index].as_py() for index in range(0, 2598, 130))  # 20 articles
    total = sum(counts.values())
    agree = fast_sum = reference_sum = 0
    for word, frequency in counts.items():
        fast, reference = count_syllables(word), count_syllables_pyphen(word)
        agree += frequency * (fast == reference)
        fast_sum += frequency * fast
        reference_sum += frequency * reference
    print(f"token agreement {agree / total:.4f}, mean difference {(fast_sum - reference_sum) / total:+.4f}")
    assert total > 20_000
    assert agree / total >= 0.95
    assert abs(fast_sum - reference_sum) / total < 0.05


def test_rarity_uses_corpus_frequencies():
    table, unseen = log_rarity_table({"der": 100, "hund": 1}, total=1000)
    assert table["der"] == pytest.approx(1.0)
    assert table["hund"] == pytest.approx(3.0)
    assert unseen == pytest.approx(-math.log10(0.5 / 1000))
    features = features_from_counts(count_text("Der Hund bellt", Lexicon(table, unseen)))
    assert features["rarity"] == pytest.approx((1.0 + 3.0 + unseen) / 3)


def test_text_without_words_has_zero_features():
    features = features_from_counts(count_text("1972 – 1974 (§ 3)"))
    assert features == dict.fromkeys(FEATURES, 0.0)


def test_combined_score_of_reference_is_zero():
    from spikewalze_cli.data.difficulty import REFERENCE

    assert combined_score({name: mean for name, (mean, _, _) in REFERENCE.items()}) == 0.0


GERMAN = st.text(alphabet=st.sampled_from(list("abcdeäöüßAEIOUÄÖÜ ,.!?-'\n\t0123456789„“()")), max_size=300)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(GERMAN, st.text(max_size=200)))
def test_features_are_finite_and_in_range(text):
    counts = count_text(text, Lexicon({"der": 1.0}, 5.0))
    features = features_from_counts(counts)
    assert all(math.isfinite(value) for value in features.values())
    assert 0.0 <= features["long_word_share"] <= 1.0
    assert features["comma_density"] >= 0.0
    assert features["flesch_amstad"] <= 180.0
    if counts.words:
        assert features["syllables_per_word"] >= 1.0
        assert features["sentence_length"] >= 1.0 / max(counts.sentences, 1)
        assert 1.0 <= features["rarity"] <= 5.0
    assert math.isfinite(combined_score(features))
