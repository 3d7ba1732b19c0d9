"""CoMiGS's client splits (spec-comigs §4) on local files shaped like the hub datasets."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_lora.config import DataSpec
from fedjax_lora.data import comigs_datasets as cd
from fedjax_lora.data.domains import split_articles
from tests.test_trust_weighted_data import VOCAB, ByteTokenizer, _domain_of, _jsonl

TOK = ByteTokenizer()


def _streams(data, split):
    tokens = getattr(data, split)
    return [tokens.stream(i) for i in range(data.num_clients)]


def test_wikipedia_one_language_per_user_in_every_split(tmp_path):
    sources = [
        _jsonl(
            tmp_path / f"wiki_{lang}.jsonl",
            [{"id": str(k), "text": f"{lang}wiki {k} " * 6} for k in range(40)],
        )
        for lang in cd.LANGUAGES
    ]
    data = cd.wikipedia(
        tokenizer=TOK,
        vocab_size=VOCAB,
        sources=sources,
        budget=cd.Budget(clients_per_category=2, train_tokens=300, val_tokens=60, test_tokens=50),
    )
    assert list(data.client_names) == [f"{lang}-{c}" for lang in cd.LANGUAGES for c in range(2)]
    marks = {lang: f"{lang}wiki".encode() for lang in cd.LANGUAGES}
    for split, n in (("train", 300), ("val", 60), ("test", 50)):
        for i, stream in enumerate(_streams(data, split)):
            assert len(stream) == n
            assert _domain_of(stream, marks) == {cd.LANGUAGES[i // 2]}
    np.testing.assert_allclose(data.mixtures, np.eye(4)[np.arange(8) // 2])
    # The two users of a language hold different (consecutive) token ranges of its pool.
    train = _streams(data, "train")
    assert not np.array_equal(train[0], train[1])


def test_ag_news_is_out_of_distribution(tmp_path):
    labels = ("World", "Sports", "Business", "SciTech")
    for split, n in (("train", 40), ("test", 24)):
        _jsonl(
            tmp_path / f"{split}.jsonl",
            [{"text": f"{labels[k % 4]} news {k}.", "label": k % 4} for k in range(4 * n)],
        )
    data = cd.ag_news(
        tokenizer=TOK,
        vocab_size=VOCAB,
        source=str(tmp_path),
        budget=cd.Budget(train_tokens=200, val_tokens=120, test_tokens=120),
    )
    marks = {name: name.encode() for name in labels}
    for i, stream in enumerate(_streams(data, "train")):
        assert _domain_of(stream, marks) == {labels[i]}
    for split in ("val", "test"):
        for stream in _streams(data, split):
            assert len(stream) == 120 and _domain_of(stream, marks) == set(labels)
    np.testing.assert_allclose(data.mixtures, np.eye(4))


def test_slimpajama_subsets_and_from_spec(tmp_path):
    rows = [
        {"text": f"{c} doc {k} " * 5, "meta": {"redpajama_set_name": c}}
        for k in range(30)
        for c in cd.SLIMPAJAMA_CATEGORIES
    ]
    path = _jsonl(tmp_path / "slimpajama.jsonl", rows)
    spec = DataSpec(
        source="comigs_slimpajama",
        paths=(path,),
        tokens_per_client=200,
        val_fraction=0.2,
        test_fraction=0.2,
        clients_per_group=1,
    )
    data = cd.from_spec(spec, tokenizer=TOK, vocab_size=VOCAB, seq_len=8)
    marks = {c: c.encode() for c in cd.SLIMPAJAMA_CATEGORIES}
    for split, n in (("train", 200), ("val", 40), ("test", 40)):
        for i, stream in enumerate(_streams(data, split)):
            assert len(stream) == n and _domain_of(stream, marks) == {cd.SLIMPAJAMA_CATEGORIES[i]}
    with pytest.raises(ValueError, match="needs a real tokenizer"):
        cd.from_spec(spec, tokenizer=None, vocab_size=VOCAB, seq_len=8)
    with pytest.raises(ValueError, match="one source"):
        cd.from_spec(
            DataSpec(source="comigs_ag_news", paths=("a", "b")),
            tokenizer=TOK,
            vocab_size=VOCAB,
            seq_len=8,
        )


def test_split_articles_partitions_every_document():
    docs = [f"d{i}" for i in range(10)]
    parts = split_articles(docs, np.random.default_rng(0), (0.8, 0.1, 0.1))
    assert [len(p) for p in parts] == [8, 1, 1]
    assert sorted(sum(parts, [])) == sorted(docs)
    assert [
        len(p) for p in split_articles(docs[:3], np.random.default_rng(0), (0.9, 0.05, 0.05))
    ] == [1, 1, 1]
    with pytest.raises(ValueError, match="sum to 1"):
        split_articles(docs, np.random.default_rng(0), (0.5, 0.2))
