"""Partitioners: sizes, disjointness, Dirichlet determinism and balancing, realised mixtures."""

import numpy as np
import pytest

from fedjax_lora.data.partition import (
    category_proportions,
    check_proportions,
    dirichlet,
    mixed,
    specific,
)


def _labels(counts, seed=0):
    """A shuffled label vector with `counts[k]` examples of class k."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


def _assert_disjoint(parts, n_total=None):
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)
    if n_total is not None:
        assert len(allidx) == n_total


def test_specific_sizes_categories_and_disjointness():
    labels = _labels([11, 8, 9])
    parts = specific(labels, 6)
    _assert_disjoint(parts, 28)
    assert [len(p) for p in parts] == [6, 5, 4, 4, 5, 4]
    for i, p in enumerate(parts):
        assert np.all(labels[p] == i // 2)
    # blocked chunks of class 0 are consecutive in dataset order
    np.testing.assert_array_equal(np.concatenate(parts[:2]), np.flatnonzero(labels == 0))


def test_specific_interleave_and_seed():
    labels = _labels([10, 10, 10])
    parts = specific(labels, 6, interleave=True, seed=3)
    assert [int(labels[p][0]) for p in parts] == [0, 1, 2, 0, 1, 2]
    _assert_disjoint(parts, 30)
    again = specific(labels, 6, interleave=True, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[0], specific(labels, 6, interleave=True)[0])


def test_specific_ignores_negative_labels_and_errors():
    labels = np.array([0, 0, -1, 1, 1, -1])
    parts = specific(labels, 2)
    assert sorted(np.concatenate(parts).tolist()) == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="not divisible across the 2 categories"):
        specific(labels, 3)
    with pytest.raises(ValueError, match="client 2 ends up with no data"):
        specific(np.array([0, 0, 1, 1, 1]), 6)


def test_mixed_realises_proportions_within_tolerance():
    labels = _labels([3000, 3000, 3000, 3000], seed=1)
    p = np.array(
        [[0.25, 0.75, 0, 0], [0.75, 0.25, 0, 0], [0, 0, 0.25, 0.75], [0, 0, 0.75, 0.25]]
    )  # AG News "mixed"
    parts = mixed(labels, p, seed=0)
    _assert_disjoint(parts)
    assert all(len(x) == 3000 for x in parts)
    counts = np.stack([np.bincount(labels[x], minlength=4) for x in parts])
    np.testing.assert_allclose(counts / counts.sum(1, keepdims=True), p, atol=1e-3)
    np.testing.assert_allclose(category_proportions(labels, parts), p, atol=1e-3)


def test_mixed_uneven_columns_and_sample_size():
    labels = _labels([1000, 400, 600], seed=2)
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=5)
    parts = mixed(labels, p)
    _assert_disjoint(parts)
    sizes = np.array([1000, 400, 600])
    m = len(parts[0])
    assert all(len(x) == m for x in parts)
    # m is (up to rounding) the largest size with m * sum_i p[i, k] <= n_k for every category
    assert m * p.sum(0).max() <= sizes.max() and m > min(sizes / p.sum(0)) - p.shape[0]
    counts = np.stack([np.bincount(labels[x], minlength=3) for x in parts])
    assert np.all(np.abs(counts - m * p) < 1)
    assert np.all(counts.sum(0) <= sizes)
    assert all(len(x) == 50 for x in mixed(labels, p, samples_per_client=50))
    with pytest.raises(ValueError, match="exceeds what the data supports"):
        mixed(labels, p, samples_per_client=m + 1)


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        (np.array([0.5, 0.5]), "2-D"),
        (np.array([[0.5, 0.4]]), "row 0 sums to 0.9"),
        (np.array([[1.5, -0.5]]), "non-negative"),
        (np.array([[np.nan, 1.0]]), "finite"),
        (np.array([[0.2, 0.3, 0.5]]), "3 columns but there are 2 categories"),
    ],
)
def test_bad_proportion_matrix(matrix, match):
    with pytest.raises(ValueError, match=match):
        mixed(np.array([0, 1, 0, 1]), matrix)
    if "categories" not in match:
        with pytest.raises(ValueError, match=match):
            check_proportions(matrix)


def _reference_dirichlet(y, num_parts, alpha, seed, num_classes):
    """FedAMoLE's `partition_idx_dir`, transcribed, on the legacy global NumPy RNG."""
    np.random.seed(seed)
    min_size, n = 0, y.shape[0]
    while min_size < 10:
        idx_parts = [[] for _ in range(num_parts)]
        for k in range(num_classes):
            idx_k = np.where(y == k)[0]
            np.random.shuffle(idx_k)
            proportions = np.random.dirichlet(np.repeat(alpha, num_parts))
            proportions = np.array(
                [
                    p * (len(ip) < n / num_parts)
                    for p, ip in zip(proportions, idx_parts, strict=True)
                ]
            )
            proportions = proportions / proportions.sum()
            proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
            for ip, part in zip(idx_parts, np.split(idx_k, proportions), strict=True):
                ip.extend(part.tolist())
        min_size = min(len(ip) for ip in idx_parts)
    for ip in idx_parts:
        np.random.shuffle(ip)
    return idx_parts


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_matches_reference_transcription(alpha):
    y = _labels([300, 120, 500, 80], seed=4)
    y[:7] = -1  # unlabelled rows count in N but are never assigned
    ours = dirichlet(y, 10, alpha, seed=7, num_classes=4)
    ref = _reference_dirichlet(y, 10, alpha, 7, 4)
    assert [p.tolist() for p in ours] == ref
    _assert_disjoint(ours, int(np.sum(y >= 0)))
    assert min(len(p) for p in ours) >= 10


def test_dirichlet_deterministic_and_seed_dependent():
    y = _labels([200, 200, 200])
    a, b = dirichlet(y, 5, 0.5, seed=1), dirichlet(y, 5, 0.5, seed=1)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    c = dirichlet(y, 5, 0.5, seed=2)
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_dirichlet_balancing_rule_caps_clients():
    # With the rule, a client stops receiving new classes once it holds >= N/C examples, so no
    # client can exceed N/C + (largest class); without it one client can take nearly everything.
    y = _labels([100] * 20, seed=5)
    cap = len(y) / 8
    for seed in range(5):
        parts = dirichlet(y, 8, 0.05, seed=seed)
        sizes = np.array([len(p) for p in parts])
        assert sizes.max() < cap + 100
        # replay the class order: once a client reaches the cap its share is zeroed (it can still
        # get 1 example from the reference's truncated float cumsum at the last cut)
        order_sizes = np.zeros(8)
        for k in range(20):
            held = np.array([np.sum(y[p] == k) for p in parts])
            assert np.all(held[order_sizes >= cap] <= 1)
            order_sizes += held


def test_dirichlet_errors():
    with pytest.raises(ValueError, match="cannot give 10 clients >= 10"):
        dirichlet(_labels([30, 30]), 10, 1.0, seed=0)
    with pytest.raises(ValueError, match="alpha > 0"):
        dirichlet(_labels([30, 30]), 2, 0.0, seed=0)


def test_category_proportions_by_hand():
    labels = np.array([0, 0, 1, 2, 2, 2])
    out = category_proportions(labels, [np.array([0, 2]), np.array([3, 4, 5, 1])])
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.0], [0.25, 0.0, 0.75]])


def test_largest_remainder_by_hand():
    from fedjax_lora.data.partition import largest_remainder

    np.testing.assert_array_equal(largest_remainder(np.array([0.5, 0.3, 0.2]), 7), [4, 2, 1])
    np.testing.assert_array_equal(
        largest_remainder(np.array([[1 / 3, 1 / 3, 1 / 3], [0.25, 0.75, 0]]), 10),
        [[4, 3, 3], [3, 7, 0]],  # ties go to the first category,
    )
