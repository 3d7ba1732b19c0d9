"""Fortune-file loader on tiny self-made files in Debian's layout (tests/data/fortunes)."""

from pathlib import Path

import pytest

from fedjax_lora.data.fortunes import (
    list_languages,
    list_topics,
    load_language,
    load_topic,
    load_topics,
    parse_fortunes,
)

ROOT = Path(__file__).parent / "data" / "fortunes"


def test_parse_fortunes_splits_on_percent_lines():
    text = "one\n%\ntwo lines\nstill two\n%\n%\n  \n%\n100% sure\n"
    assert parse_fortunes(text) == ["one", "two lines\nstill two", "100% sure"]


def test_languages_and_topics_skip_index_offensive_and_links():
    assert list_languages(ROOT) == ["en", "de", "es"]  # off/ is not a language
    assert list_topics("en", ROOT) == ["love", "science"]  # no .dat, .u8, -o
    assert list_topics("de", ROOT) == ["computer", "essen"]
    assert list_topics("es", ROOT) == ["arte"]  # ".fortunes" suffix dropped


def test_load_topic_language_and_encoding():
    assert load_topic("love", root=ROOT) == ["Love is patient.", "All you need is love."]
    science = load_topic("science", root=ROOT)
    assert len(science) == 3 and science[1] == "An electron walks into a bar.\nIt stays positive."
    # a Latin-1 file decodes
    assert load_topic("essen", "de", ROOT)[0] == "Grüße aus Berlin."
    topics = load_topics(language="es", root=ROOT)
    assert topics == {"arte": ["El arte es largo.", "La vida es breve.", "Pintar es pensar."]}
    assert load_language("de", ROOT) == [
        "Der Computer rechnet.",
        "Das Netz ist langsam.",
        "Grüße aus Berlin.",
        "Guten Appetit!",
    ]


def test_fortune_errors(tmp_path):
    with pytest.raises(KeyError, match="no fortune topic 'sports'"):
        load_topic("sports", root=ROOT)
    with pytest.raises(FileNotFoundError, match="fortunes-it"):
        list_topics("it", ROOT)
    with pytest.raises(FileNotFoundError, match="no fortunes folder"):
        list_languages(tmp_path / "missing")
