"""Tokenization into streams and `FederatedData` building / validation."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from fedjax_lora.data.federated import build_federated, uniform_evaluation
from fedjax_lora.data.streams import MaskedStream
from fedjax_lora.data.tokenize import tokenize_prompt_target, tokenize_texts

WORDS = ["<|endoftext|>", "[UNK]", "the", "cat", "sat", "dog", "ran", "a", "mat", "on", "yes", "no"]
VOCAB = {w: i for i, w in enumerate(WORDS)}
EOS = VOCAB["<|endoftext|>"]


@pytest.fixture(scope="module")
def word_tokenizer():
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.fixture(scope="module")
def hf_tokenizer(word_tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=word_tokenizer, eos_token="<|endoftext|>")


def _ids(text):
    return [VOCAB.get(w, VOCAB["[UNK]"]) for w in text.split()]


@pytest.mark.parametrize("which", ["tokenizers", "transformers"])
def test_tokenize_texts_eos_separated(which, word_tokenizer, hf_tokenizer):
    tok = word_tokenizer if which == "tokenizers" else hf_tokenizer
    texts = ["the cat sat", "a dog ran on the mat"]
    stream = tokenize_texts(texts, tok, vocab_size=len(WORDS))
    expected = _ids(texts[0]) + [EOS] + _ids(texts[1]) + [EOS]
    assert stream.dtype == np.int32
    np.testing.assert_array_equal(stream, expected)
    none = tokenize_texts(texts, tok, vocab_size=len(WORDS), separator="none")
    np.testing.assert_array_equal(none, _ids(texts[0]) + _ids(texts[1]))
    space = tokenize_texts(texts, tok, vocab_size=len(WORDS), separator="space")
    np.testing.assert_array_equal(space, _ids("the cat sat a dog ran on the mat"))


def test_tokenize_vocab_mismatch(word_tokenizer):
    with pytest.raises(ValueError, match=r"vocabulary mismatch.*id 8.*\[0, 5\)"):
        tokenize_texts(["the mat"], word_tokenizer, vocab_size=5)


def test_tokenize_without_eos_token_needs_eos_id():
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="pass eos_id="):
        tokenize_texts(["x x"], tok, vocab_size=2)
    np.testing.assert_array_equal(tokenize_texts(["x x"], tok, vocab_size=2, eos_id=0), [1, 1, 0])


def test_prompt_target_mask(word_tokenizer):
    ms = tokenize_prompt_target(
        ["the cat sat", "a dog"], ["yes", "no no"], word_tokenizer, vocab_size=len(WORDS), bos_id=1
    )
    expected = [1] + _ids("the cat sat yes") + [EOS] + [1] + _ids("a dog no no") + [EOS]
    np.testing.assert_array_equal(ms.tokens, expected)
    np.testing.assert_array_equal(ms.loss_mask, [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1])


def test_build_from_texts_splits_documents(word_tokenizer):
    docs = [f"the {w}" for w in ["cat", "dog", "mat", "cat", "dog", "mat", "cat", "dog", "a", "on"]]
    fd = build_federated(
        [docs, docs[:5]], vocab_size=len(WORDS), tokenizer=word_tokenizer, split=(0.6, 0.2, 0.2)
    )
    # client 0: 6 / 2 / 2 documents of 3 tokens each (2 words + EOS)
    # client 1: 5 documents cut at rint([3, 4, 5]) -> 3 / 1 / 1
    np.testing.assert_array_equal(fd.train.lengths, [18, 9])
    np.testing.assert_array_equal(fd.val.lengths, [6, 3])
    np.testing.assert_array_equal(fd.test.lengths, [6, 3])
    np.testing.assert_array_equal(
        fd.val.stream(0), _ids("the cat") + [EOS] + _ids("the dog") + [EOS]
    )
    assert fd.client_names == ("client0", "client1")
    np.testing.assert_array_equal(fd.groups, [0, 1])
    fd.validate(seq_len=2)


def test_build_from_streams_and_explicit_splits():
    a = np.arange(100) % 7
    fd = build_federated(
        [a, {"train": np.arange(30) % 5, "val": np.arange(12) % 5, "test": np.arange(9) % 5}],
        vocab_size=7,
        split=(0.7, 0.2, 0.1),
        client_names=["a", "b"],
        mixtures=np.array([[0.2, 0.8], [1.0, 0.0]]),
    )
    np.testing.assert_array_equal(fd.train.stream(0), a[:70])
    np.testing.assert_array_equal(fd.val.stream(0), a[70:90])
    np.testing.assert_array_equal(fd.test.stream(0), a[90:])
    np.testing.assert_array_equal(fd.train.stream(1), np.arange(30) % 5)
    np.testing.assert_array_equal(fd.groups, [1, 0])  # argmax of the mixtures
    assert fd.train.loss_mask is None
    fd.validate(seq_len=8)


def test_build_with_masked_streams():
    ms = MaskedStream(np.arange(20) % 4, (np.arange(20) % 2).astype(np.uint8))
    fd = build_federated([ms, np.arange(10) % 4], vocab_size=4, split=(0.5, 0.5, 0.0))
    np.testing.assert_array_equal(fd.train.loss_mask[0, :10], np.arange(10) % 2)
    np.testing.assert_array_equal(fd.train.loss_mask[1, :5], 1)  # unmasked client: all targets
    np.testing.assert_array_equal(fd.val.loss_mask[0, :10], np.arange(10, 20) % 2)
    fd.validate(seq_len=3, splits=("train", "val"))


def test_validate_errors_name_the_client():
    fd = build_federated(
        [np.arange(50) % 9, np.arange(12) % 9], vocab_size=9, client_names=["big", "tiny"]
    )
    with pytest.raises(
        ValueError, match=r"client 1 \('tiny'\): train stream has 10 tokens.*seq_len"
    ):
        fd.validate(seq_len=16)
    with pytest.raises(ValueError, match=r"vocabulary mismatch.*client 0 \('big'\)'s train"):
        fd.validate(seq_len=3, vocab_size=8)
    empty = build_federated([{"train": np.arange(10), "val": np.zeros(0, np.int32)}], vocab_size=10)
    with pytest.raises(ValueError, match=r"client 0 \('client0'\) has no val data"):
        empty.validate(seq_len=4)


def test_build_errors(word_tokenizer):
    with pytest.raises(ValueError, match="pass tokenizer="):
        build_federated([["the cat"]], vocab_size=12)
    with pytest.raises(ValueError, match="split must be 3 non-negative fractions"):
        build_federated([np.arange(10)], vocab_size=10, split=(0.8, 0.3, 0.1))
    with pytest.raises(ValueError, match="explicit splits need keys"):
        build_federated([{"train": np.arange(10)}], vocab_size=10)
    with pytest.raises(TypeError, match="expected a sequence of texts"):
        build_federated(["just one string"], vocab_size=10)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        build_federated([np.arange(10)], vocab_size=10, mixtures=np.array([[0.3, 0.3]]))


def test_reference_and_shared_eval_checked(word_tokenizer):
    fd = build_federated(
        [np.arange(40) % 12],
        vocab_size=12,
        split=(0.5, 0.25, 0.25),
        tokenizer=word_tokenizer,
        shared_eval={"ood": ["the cat sat on the mat"] * 3, "ids": np.arange(5)},
        reference=np.array([[1, 2, 3], [4, 5, 13]]),
    )
    assert len(fd.shared_eval["ood"]) == 21
    with pytest.raises(ValueError, match="shared eval stream 'ids' has 5 tokens"):
        fd.validate(seq_len=8)
    with pytest.raises(ValueError, match="vocabulary mismatch: reference set contains id 13"):
        fd.validate(seq_len=3)


def test_uniform_evaluation_gives_every_client_an_equal_share_of_every_group():
    """CoMiGS's out-of-distribution setting on grouped data: client i's val/test is piece i of
    every group's pooled stream (NumPy reference), masks travel with tokens, train unchanged."""
    rng = np.random.default_rng(0)
    groups = [0, 1, 0, 1]
    lengths = {"val": [9, 14, 11, 7], "test": [12, 12, 13, 10]}
    streams = {s: [rng.integers(0, 50, n) for n in ns] for s, ns in lengths.items()}
    masks = [rng.integers(0, 2, n).astype(np.uint8) for n in lengths["val"]]
    clients = [
        {
            "train": rng.integers(0, 50, 40),
            "val": MaskedStream(streams["val"][i], masks[i]),
            "test": streams["test"][i],
        }
        for i in range(4)
    ]
    fd = build_federated(clients, vocab_size=50, groups=groups)
    out = uniform_evaluation(fd)
    np.testing.assert_array_equal(out.train.tokens, fd.train.tokens)
    for split in ("val", "test"):
        pools = [
            np.concatenate([streams[split][i] for i in (0, 2)]),
            np.concatenate([streams[split][i] for i in (1, 3)]),
        ]
        m = min(len(p) for p in pools) // 4
        for i in range(4):
            expected = np.concatenate([p[i * m : (i + 1) * m] for p in pools])
            np.testing.assert_array_equal(out.split(split).stream(i), expected)
    mask_pools = [np.concatenate([masks[0], masks[2]]), np.concatenate([masks[1], masks[3]])]
    m = min(len(p) for p in mask_pools) // 4
    for i in range(4):
        expected = np.concatenate([p[i * m : (i + 1) * m] for p in mask_pools])
        np.testing.assert_array_equal(out.val.loss_mask[i, : out.val.lengths[i]], expected)
    with pytest.raises(ValueError, match="fewer tokens than the 4 clients"):
        tiny = [{"train": np.arange(8), "val": np.arange(2)} for _ in range(4)]
        uniform_evaluation(build_federated(tiny, vocab_size=50, groups=groups))


def test_keep_train_fraction_truncates_each_training_stream():
    """Users with different data amounts: client i keeps round(f_i · |train_i|) leading tokens
    (and their mask); val/test untouched; a wrong count or value names the setting."""
    from fedjax_lora.data import keep_train_fraction

    rng = np.random.default_rng(1)
    train = [rng.integers(0, 30, n) for n in (40, 25, 33)]
    masks = [rng.integers(0, 2, len(t)).astype(np.uint8) for t in train]
    clients = [
        {"train": MaskedStream(t, m), "val": rng.integers(0, 30, 9)}
        for t, m in zip(train, masks, strict=True)
    ]
    fd = build_federated(clients, vocab_size=30)
    out = keep_train_fraction(fd, [1.0, 0.2, 0.5])
    for i, (f, t, m) in enumerate(zip((1.0, 0.2, 0.5), train, masks, strict=True)):
        k = int(round(f * len(t)))
        np.testing.assert_array_equal(out.train.stream(i), t[:k])
        np.testing.assert_array_equal(out.train.loss_mask[i, :k], m[:k])
        np.testing.assert_array_equal(out.val.stream(i), fd.val.stream(i))
    for bad in ([1.0, 0.5], [1.0, 0.0, 0.5], [1.0, 1.5, 0.5]):
        with pytest.raises(ValueError, match="train_fractions"):
            keep_train_fraction(fd, bad)
