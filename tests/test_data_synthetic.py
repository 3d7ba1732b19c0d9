"""Synthetic Markov corpus: determinism, ground truth, group separation, overlap."""

import numpy as np
import pytest

from fedjax_lora.data.synthetic import make_markov_sources, synthetic_corpus


def _bigram_conditional(stream, v):
    """Empirical P(next | prev) [V, V] from a stream, counted with np.bincount."""
    counts = np.bincount(stream[:-1].astype(np.int64) * v + stream[1:], minlength=v * v)
    counts = counts.reshape(v, v).astype(np.float64)
    return counts, counts / np.maximum(counts.sum(1, keepdims=True), 1)


def _bigram_dist(stream, v):
    counts, _ = _bigram_conditional(stream, v)
    return counts / counts.sum()


def test_deterministic_and_shapes():
    a = synthetic_corpus(3, 2, vocab_size=64, train_tokens=3000, val_tokens=500, test_tokens=500)
    b = synthetic_corpus(3, 2, vocab_size=64, train_tokens=3000, val_tokens=500, test_tokens=500)
    c = synthetic_corpus(
        3, 2, vocab_size=64, train_tokens=3000, val_tokens=500, test_tokens=500, seed=1
    )
    np.testing.assert_array_equal(a.train.tokens, b.train.tokens)
    np.testing.assert_array_equal(a.reference, b.reference)
    assert not np.array_equal(a.train.tokens, c.train.tokens)
    assert a.train.tokens.shape == (6, 3000) and a.val.tokens.shape == (6, 500)
    np.testing.assert_array_equal(a.groups, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(a.mixtures, np.repeat(np.eye(3), 2, axis=0))
    assert a.train.tokens.max() < 64 and a.vocab_size == 64
    assert a.reference.shape == (16, 64)
    a.validate(seq_len=32)


def test_same_group_clients_are_closer_than_cross_group():
    v = 128
    fd = synthetic_corpus(4, 3, vocab_size=v, overlap=0.3, train_tokens=40_000, seed=3)
    dists = [_bigram_dist(fd.train.stream(i), v) for i in range(fd.num_clients)]
    tv = np.array([[0.5 * np.abs(p - q).sum() for q in dists] for p in dists])
    same = fd.groups[:, None] == fd.groups[None, :]
    off_diag = ~np.eye(fd.num_clients, dtype=bool)
    assert tv[same & off_diag].max() < tv[~same].min()


def test_empirical_transitions_match_ground_truth_matrix():
    v = 32
    src = make_markov_sources(2, v, overlap=0.4, branching=4, seed=5)
    for g in range(2):
        t = src.transition_matrix(g)
        np.testing.assert_allclose(t.sum(1), 1.0)
        assert np.count_nonzero(t, axis=1).max() <= 8  # <= branching from each component
        docs = src.sample(np.full(400, g), 256, np.random.default_rng(g))
        counts = np.zeros((v, v))
        for d in docs:
            c, _ = _bigram_conditional(d, v)
            counts += c
        emp = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        rows = counts.sum(1) > 2000
        assert rows.sum() >= 5
        np.testing.assert_allclose(emp[rows], t[rows], atol=0.04)
        first = np.bincount(docs[:, 0], minlength=v) / len(docs)
        assert 0.5 * np.abs(first - src.start_distribution(g)).sum() < 0.2


def test_overlap_one_makes_groups_identical_and_zero_distinct():
    same = make_markov_sources(3, 50, overlap=1.0, seed=2)
    for g in (1, 2):
        np.testing.assert_array_equal(same.transition_matrix(0), same.transition_matrix(g))
        np.testing.assert_array_equal(same.start_distribution(0), same.start_distribution(g))
    distinct = make_markov_sources(3, 50, overlap=0.0, seed=2)
    t0, t1 = distinct.transition_matrix(0), distinct.transition_matrix(1)
    assert 0.5 * np.abs(t0 - t1).sum(1).mean() > 0.8
    # empirically: with overlap 1 cross-group clients are as close as same-group ones
    fd = synthetic_corpus(2, 2, vocab_size=64, overlap=1.0, train_tokens=30_000, seed=4)
    d = [_bigram_dist(fd.train.stream(i), 64) for i in range(4)]
    tv = lambda i, j: 0.5 * np.abs(d[i] - d[j]).sum()
    assert abs(tv(0, 2) - tv(0, 1)) < 0.05 and abs(tv(1, 3) - tv(2, 3)) < 0.05


def test_mixtures_realised_document_by_document():
    v = 64
    mix = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    fd = synthetic_corpus(
        2, 2, vocab_size=v, mixtures=mix, train_tokens=64 * 200, doc_len=64, seed=7
    )
    np.testing.assert_array_equal(fd.groups, [0, 0, 1, 1])
    np.testing.assert_array_equal(fd.mixtures, mix)
    # the pure clients' bigram distributions bracket the mixed ones
    d = [_bigram_dist(fd.train.stream(i), v) for i in range(4)]
    tv = lambda i, j: 0.5 * np.abs(d[i] - d[j]).sum()
    assert tv(1, 0) < tv(1, 3) and tv(2, 3) < tv(2, 0)


def test_shared_eval_and_errors():
    fd = synthetic_corpus(2, 1, vocab_size=40, train_tokens=500, shared_eval_tokens=700)
    assert fd.shared_eval["uniform"].shape == (700,)
    with pytest.raises(ValueError, match="overlap must lie in"):
        synthetic_corpus(2, 1, overlap=1.5)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        synthetic_corpus(2, 1, mixtures=np.array([[0.5, 0.2], [0, 1]]))
    with pytest.raises(ValueError, match="3 rows for 2 clients"):
        synthetic_corpus(2, 1, mixtures=np.full((3, 2), 0.5))


def test_uniform_eval_mixture_targets_every_source():
    """`eval_mixture="uniform"` (CoMiGS's out-of-distribution setting): validation and test of
    every client come from the uniform mixture, its training data from its own source."""
    v = 64
    kw = dict(vocab_size=v, train_tokens=20_000, val_tokens=20_000, test_tokens=2_000, seed=4)
    fd = synthetic_corpus(3, 1, eval_mixture="uniform", **kw)
    own = synthetic_corpus(3, 1, **kw)
    np.testing.assert_array_equal(fd.train.tokens, own.train.tokens)
    tv = lambda x, y: 0.5 * np.abs(_bigram_dist(x, v) - _bigram_dist(y, v)).sum()
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert tv(fd.val.stream(i), fd.val.stream(j)) < 0.25 * tv(
            own.val.stream(i), own.val.stream(j)
        )
    src = make_markov_sources(3, v, seed=4)
    for i in range(3):  # every client's validation stream uses every group's transitions
        pairs = set(zip(fd.val.stream(i)[:-1].tolist(), fd.val.stream(i)[1:].tolist(), strict=True))
        for g in range(3):
            only_g = {(a, int(b)) for a in range(v) for b in src.successors[g, a]}
            for h in set(range(3)) - {g}:
                only_g -= {(a, int(b)) for a in range(v) for b in src.successors[h, a]}
            assert len(pairs & only_g) > 50
    with pytest.raises(ValueError, match="eval_mixture"):
        synthetic_corpus(2, 1, vocab_size=v, eval_mixture="ood")


def test_train_fractions_config_gives_users_different_data_amounts():
    """`data.train_fractions` (CoMiGS's data-quantity setting) through the config path."""
    from fedjax_lora.config import load
    from fedjax_lora.experiment import build_data

    overrides = ["data.num_groups=2", "data.clients_per_group=1", "data.tokens_per_client=600"]
    full = build_data(load(None, overrides), 64)
    part = build_data(load(None, [*overrides, "data.train_fractions=[1.0,0.25]"]), 64)
    np.testing.assert_array_equal(part.train.stream(0), full.train.stream(0))
    np.testing.assert_array_equal(part.train.stream(1), full.train.stream(1)[:150])
    np.testing.assert_array_equal(part.val.tokens, full.val.tokens)
