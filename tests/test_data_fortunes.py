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
from fedjax_lora.errors import DataError

ROOT = Path(__file__).parent / "data" / "fortunes"


def test_parse_fortunes_splits_on_percent_lines():
    text = "one\n%\ntwo lines\nstill two\n%\n%\n  \n%\n100% sure\n"
    assert parse_fortunes(text) == ["one", "two lines\nstill two", "100% sure"]


def test_languages_and_topics_skip_index_offensive_and_links():
    assert list_languages(ROOT) == ["en", "de", "es"]  # off/ is not a language
    assert list_topics("en", ROOT) == ["love", "science"]  # no .dat, .u8, -o
    assert list_topics("de", ROOT) == ["computer", "essen"]
    assert list_topics("es", ROOT) == ["arte"]  # ".fortunes" suffix dropped


def test_load_topic_language_and_encoding(tmp_path):
    assert load_topic("love", root=ROOT) == ["Love is patient.", "All you need is love."]
    science = load_topic("science", root=ROOT)
    assert len(science) == 3 and science[1] == "An electron walks into a bar.\nIt stays positive."
    with pytest.raises(DataError, match=r"essen is not valid utf-8 at byte 2"):
        load_topic("essen", "de", ROOT)  # a Latin-1 file: strict by default
    utf16 = tmp_path / "utf16"
    utf16.write_bytes("naive\n%\ncafe\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"utf16 holds NUL characters as utf-8 \(at byte 1"):
        load_topic("utf16", root=tmp_path)
    mixed = tmp_path / "mixed"
    mixed.write_bytes("naïve café\n%\n".encode() + b"\xff\n")
    with pytest.raises(DataError, match=r"mixed is not valid utf-8 at byte 15"):
        load_topic("mixed", root=tmp_path)
    assert load_topic("essen", "de", ROOT, ("utf-8", "latin-1"))[0] == "Grüße aus Berlin."
    topics = load_topics(language="es", root=ROOT)
    assert topics == {"arte": ["El arte es largo.", "La vida es breve.", "Pintar es pensar."]}
    assert load_language("de", ROOT, ("utf-8", "latin-1")) == [
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


def _checkpoint(tmp_path, vocab):
    from fedjax_lora.export import save_merged
    from fedjax_lora.models import ModelConfig, from_config

    cfg = ModelConfig(
        family="gpt2",
        vocab_size=vocab,
        d_model=16,
        n_layers=1,
        n_heads=2,
        d_ff=32,
        max_positions=32,
    )
    return save_merged(from_config(cfg), tmp_path / f"base{vocab}")


def test_a_byte_level_checkpoint_without_tokenizer_reads_fortunes_as_bytes(tmp_path):
    """`experiment.text_tokenizer`: a checkpoint of 256 tokens without tokenizer files reads
    UTF-8 bytes; any other vocabulary without tokenizer files is refused, naming the fix."""
    from fedjax_lora.config import load
    from fedjax_lora.experiment import build_problem

    root = _animal_fortunes(tmp_path, 40, lambda k: "ab" * k)
    overrides = [
        "data.source=fortunes",
        f"data.fortunes_dir={root}",
        "data.categories=[de,es]",
        "data.clients_per_group=1",
        "training.seq_len=16",
        "lora.targets=[c_attn]",
    ]
    config = load(None, [f"model.source={_checkpoint(tmp_path, 256)}", *overrides])
    _, data = build_problem(config)
    assert data.reference.shape == (16, 16)  # held-out fortunes, 8 windows per language
    for i, language in enumerate(("de", "es")):
        text = bytes(data.train.stream(i).astype("uint8").tolist()).decode("utf-8")
        assert text.split()[0] in " ".join(load_language(language, root))
    config = load(None, [f"model.source={_checkpoint(tmp_path, 64)}", *overrides])
    with pytest.raises(ValueError, match="has no tokenizer files and a vocabulary of 64"):
        build_problem(config)


def test_uniform_evaluation_on_fortunes_mixes_every_language(tmp_path):
    """`data.eval_mixture=uniform` on fortunes (CoMiGS's out-of-distribution setting): every
    client's validation and test text holds both languages while its training text keeps its
    own; other real-data sources refuse the setting, naming the fix."""
    from fedjax_lora.config import load
    from fedjax_lora.experiment import build_data

    root = _animal_fortunes(tmp_path, 80, lambda k: "ab" * (k % 7))
    overrides = [
        "data.source=fortunes",
        f"data.fortunes_dir={root}",
        "data.categories=[de,es]",
        "data.clients_per_group=2",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
        "data.reference_sequences=0",
        "training.seq_len=16",
    ]
    text = lambda ct, i: bytes(ct.stream(i).astype("uint8").tolist()).decode("utf-8", "replace")
    own = build_data(load(None, overrides), 256)
    mixed = build_data(load(None, [*overrides, "data.eval_mixture=uniform"]), 256)
    for i in range(4):
        language_word = "Katze" if i < 2 else "gato"
        assert text(mixed.train, i) == text(own.train, i)
        assert "Katze" in text(own.val, i) if i < 2 else "gato" in text(own.val, i)
        for split in (mixed.val, mixed.test):
            assert "Katze" in text(split, i) and "gato" in text(split, i), language_word
    with pytest.raises(ValueError, match="eval_mixture=uniform is built for"):
        build_data(load(None, ["data.source=dolly", "data.eval_mixture=uniform"]), 256)


def _animal_fortunes(tmp_path: Path, count: int, tail) -> Path:
    """A fortunes root with German and Spanish files of `count` fortunes each, fortune `k`
    reading "<Katze|gato> k: <tail(k)>"."""
    root = tmp_path / "fortunes"
    for language, word in (("de", "Katze"), ("es", "gato")):
        (root / language).mkdir(parents=True)
        items = [f"{word} {k}: {tail(k)}" for k in range(count)]
        (root / language / "tiere").write_text("\n%\n".join(items) + "\n%\n")
    return root
