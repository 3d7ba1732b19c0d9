"""Trust rules against independent NumPy implementations of the reference formulas.

Wagner, Fan & Jaggi, COLM 2024 (arXiv:2404.09753); reference quirks: softmax of -perplexity (not
loss), top-100 raw logits with ties kept and the rest zeroed, row L1 normalisation, PyTorch
cosine-similarity eps semantics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lora.aggregation import trust

N = 5


# ---------------------------------------------------------------- NumPy references (float64)


def np_select_softmax(scores, temperature=1.0, top_peers=None, threshold=None, min_keep=2,
                      adjacency=None):  # fmt: skip
    """Row by row: allowed peers, top-k, threshold with `min_keep` survivors, softmax."""
    n = scores.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        allowed = [j for j in range(n) if adjacency is None or adjacency[i, j] or i == j]

        def best(cands, k, row=scores[i]):
            return sorted(cands, key=lambda c: (-row[c], c))[:k]

        if top_peers is not None:
            allowed = best(allowed, top_peers)
        if threshold is not None:
            keep_anyway = best(allowed, min_keep)
            allowed = [j for j in allowed if scores[i, j] > threshold or j in keep_anyway]
        z = np.array([scores[i, j] / temperature for j in allowed])
        e = np.exp(z - z.max())
        for j, v in zip(allowed, e / e.sum(), strict=True):
            out[i, j] = v
    return out


def np_weight_scores(leaves):
    """Double loop over clients; per row cos = <a, b> / (max(|a|, 1e-8) max(|b|, 1e-8))."""
    leaves = [np.asarray(x, np.float64) for x in leaves]
    n = leaves[0].shape[0]
    s = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            total, rows = 0.0, 0
            for x in leaves:
                a = x[i].reshape(-1, x.shape[-1])
                b = x[j].reshape(-1, x.shape[-1])
                for r in range(a.shape[0]):
                    na = max(np.sqrt(np.sum(a[r] ** 2)), 1e-8)
                    nb = max(np.sqrt(np.sum(b[r] ** 2)), 1e-8)
                    total += np.sum(a[r] * b[r]) / (na * nb)
                    rows += 1
            s[i, j] = total / rows
    return s


def np_validation_scores(ppl, use_loss=False):
    ppl = np.asarray(ppl, np.float64)
    return -(np.log(ppl) if use_loss else ppl)


def np_prediction_scores(logits, top_k=100, scale=10.0):
    logits = np.asarray(logits, np.float64)
    n, num_seq, _ = logits.shape
    sparse = np.zeros_like(logits)
    for c in range(n):
        for s in range(num_seq):
            row = logits[c, s]
            kth = np.sort(row)[::-1][top_k - 1]
            sparse[c, s] = np.where(row >= kth, row, 0.0)  # ties with the k-th value kept
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = np.abs(sparse[i] - sparse[j]).sum() / num_seq
    d = d / np.maximum(np.abs(d).sum(axis=1, keepdims=True), 1e-12)
    return -scale * d


def np_oracle(mixtures):
    m = np.asarray(mixtures, np.float64)
    n = m.shape[0]
    overlap = np.array([[np.dot(m[i], m[j]) for j in range(n)] for i in range(n)])
    return overlap / overlap.sum(axis=1, keepdims=True)


def np_oracle_scores(mixtures):
    m = np.asarray(mixtures, np.float64)
    with np.errstate(divide="ignore"):
        return np.log(m @ m.T)


def call(fn: Callable[..., jax.Array], x: Any, **options: Any) -> jax.Array:
    """`fn(x, **options)` under jit (compiling once is faster than op-by-op eager dispatch)."""
    return jax.jit(functools.partial(fn, **options))(x)


# ---------------------------------------------------------------- random inputs


def random_adapters(rng: np.random.Generator, n: int = N) -> dict[str, Any]:
    return {
        "h0": {
            "A": rng.uniform(-0.5, 0.5, (n, 6, 2)).astype(np.float32),
            "B": rng.normal(size=(n, 2, 7)).astype(np.float32),
        },
        "h1": {"A": rng.normal(size=(n, 3, 4, 2)).astype(np.float32), "B": np.zeros((n, 2, 9))},
    }


def random_ppl(rng: np.random.Generator, n: int = N) -> np.ndarray:
    return rng.uniform(1.0, 7.0, (n, n)).astype(np.float32)


def random_logits(rng: np.random.Generator, n: int = N, ties: bool = False) -> np.ndarray:
    if ties:  # few distinct values: many ties at the k-th largest
        return rng.integers(-4, 4, (n, 3, 40)).astype(np.float32)
    return rng.normal(0.0, 3.0, (n, 3, 40)).astype(np.float32)


def random_mixtures(rng: np.random.Generator, n: int = N) -> np.ndarray:
    m = rng.dirichlet(np.full(3, 0.5), n)
    m[0], m[1] = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    return m.astype(np.float32)


class Case(NamedTuple):
    fn: Callable[..., jax.Array]  # the rule under test
    make: Callable[[np.random.Generator], Any]  # random input
    np_scores: Callable[[Any], np.ndarray]  # independent NumPy scores
    options: dict[str, Any]  # rule options (besides peer selection)
    temperature: float = 1.0


CASES = {
    "weights": Case(
        trust.weight_similarity,
        random_adapters,
        lambda x: np_weight_scores(jax.tree.leaves(x)),
        {"temperature": 0.5},
        0.5,
    ),
    "validation": Case(trust.validation_trust, random_ppl, np_validation_scores, {}),
    "validation_loss": Case(
        trust.validation_trust,
        random_ppl,
        lambda x: np_validation_scores(x, use_loss=True),
        {"use_loss": True, "temperature": 0.3},
        0.3,
    ),
    "prediction": Case(
        trust.prediction_trust,
        random_logits,
        lambda x: np_prediction_scores(x, top_k=10, scale=5.0),
        {"top_k": 10, "scale": 5.0},
    ),
    "prediction_ties": Case(
        trust.prediction_trust,
        lambda rng: random_logits(rng, ties=True),
        lambda x: np_prediction_scores(x, top_k=10),
        {"top_k": 10},
    ),
    "prediction_defaults": Case(
        trust.prediction_trust,
        lambda rng: rng.normal(0.0, 3.0, (N, 4, 160)).astype(np.float32),
        np_prediction_scores,
        {},
    ),
    "oracle": Case(trust.oracle_trust, random_mixtures, np_oracle_scores, {}),
}


def _selections(scores: np.ndarray) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(0)

    def between(q: float) -> float:  # a threshold strictly between two distinct scores
        values = np.unique(scores[np.isfinite(scores)])
        i = int(q * (len(values) - 1))
        return float(values[i] + values[i + 1]) / 2

    return {
        "top_peers": {"top_peers": 2},
        "threshold": {"threshold": between(0.5)},
        "threshold_keep1": {"threshold": between(0.8), "min_keep": 1},
        "ring": {"adjacency": trust.topology("ring", N)},
        "star_top2": {"adjacency": trust.topology("star", N), "top_peers": 2},
        "random_graph_threshold": {
            "adjacency": rng.random((N, N)) < 0.5,
            "threshold": between(0.5),
        },
    }


SELECTIONS = list(_selections(np.arange(4.0)))


@pytest.mark.parametrize("case", CASES)
def test_rule_matches_numpy(case):
    c = CASES[case]
    x = c.make(np.random.default_rng(1))
    w = call(c.fn, x, **c.options)
    chex.assert_shape(w, (N, N))
    chex.assert_type(w, jnp.float32)
    expected = np_select_softmax(c.np_scores(x), c.temperature)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sum(w, axis=1), 1.0, rtol=1e-5)


def _check_selection(w: jax.Array, expected: np.ndarray, options: dict[str, Any]) -> None:
    w = np.asarray(w)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    assert np.all(w[expected == 0] == 0), "dropped peers must get exactly zero weight"
    if "adjacency" in options:
        allowed = np.asarray(options["adjacency"]) | np.eye(N, dtype=bool)
        assert np.all(w[~allowed] == 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_selection_matches_numpy(selection):
    scores = np.random.default_rng(2).normal(size=(N, N)).astype(np.float32)
    options = _selections(scores)[selection]
    w = call(trust.softmax_trust, scores, temperature=0.7, **options)
    _check_selection(w, np_select_softmax(scores, 0.7, **options), options)


@pytest.mark.parametrize("case", CASES)
def test_rule_selection_matches_numpy(case):
    """Each rule forwards the selection options and thresholds act on its own score."""
    c = CASES[case]
    x = c.make(np.random.default_rng(2))
    scores = c.np_scores(x)
    options = _selections(scores)["random_graph_threshold"]
    w = call(c.fn, x, **c.options, **options)
    _check_selection(w, np_select_softmax(scores, c.temperature, **options), options)


@pytest.mark.parametrize("case", CASES)
def test_rule_jits(case):
    c = CASES[case]
    x = c.make(np.random.default_rng(3))
    options = {**c.options, "top_peers": 3, "adjacency": trust.topology("ring", N)}
    eager = c.fn(x, **options)
    jitted = call(c.fn, x, **options)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)


def test_weight_similarity_zero_rows_score_zero():
    """B = 0 at init: its rows have zero norm, so (eps semantics) cos = 0, even with itself."""
    a = np.random.default_rng(0).normal(size=(3, 8, 4)).astype(np.float32)
    tree = {"A": a, "B": np.zeros((3, 4, 16), np.float32)}
    s = call(trust.weight_similarity_scores, tree)
    np.testing.assert_allclose(np.diag(s), 8 / 12, rtol=1e-6)
    np.testing.assert_allclose(s, s.T, rtol=1e-6)
    chex.assert_trees_all_close(
        call(trust.weight_similarity_scores, {"A": a}), s * 12 / 8, rtol=1e-5
    )


def test_validation_uses_perplexity_not_loss():
    ppl = np.array([[10.0, 13.0], [13.0, 10.0]])
    w = call(trust.validation_trust, ppl)
    np.testing.assert_allclose(w[0, 1], 1 / (1 + np.exp(3.0)), rtol=1e-5)
    w_loss = call(trust.validation_trust, ppl, use_loss=True)
    np.testing.assert_allclose(w_loss[0, 1], 10 / 23, rtol=1e-5)  # softmax(-log p) ∝ 1/p


def test_prediction_keeps_ties_at_kth_value():
    """top-1 of [2, 2, 0, -1] keeps both 2s (torch: `x[x < topk(x).values[..., -1]] = 0`)."""
    logits = np.array([[[2.0, 2.0, 0.0, -1.0]], [[3.0, 0.0, 0.0, -1.0]], [[2.0, 0.0, 0.0, -1.0]]])
    # sparsified: [2, 2, 0, 0], [3, 0, 0, 0], [2, 0, 0, 0]; d01 = 3, d02 = 2, d12 = 1.
    d = np.array([[0.0, 3.0, 2.0], [3.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    d = d / d.sum(axis=1, keepdims=True)
    expected = np.exp(-10 * d) / np.exp(-10 * d).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(call(trust.prediction_trust, logits, top_k=1), expected, rtol=1e-5)


def test_prediction_self_is_largest():
    w = call(trust.prediction_trust, random_logits(np.random.default_rng(4)), top_k=10)
    assert np.all(np.argmax(w, axis=1) == np.arange(N))


def test_oracle_row_normalised_overlap():
    m = random_mixtures(np.random.default_rng(5))
    w = call(trust.oracle_trust, m)
    np.testing.assert_allclose(w, np_oracle(m), rtol=1e-5, atol=1e-7)
    assert float(w[0, 1]) == 0.0  # disjoint domains


def test_oracle_matches_paper_on_specific_splits():
    """three_multi_specific (N=9, language i % 3): W = 1/3 for same language, else 0."""
    n = 9
    m = np.eye(3)[np.arange(n) % 3]
    same = (np.arange(n)[:, None] % 3) == (np.arange(n)[None, :] % 3)
    np.testing.assert_allclose(call(trust.oracle_trust, m), same / 3, rtol=1e-6)
    m_ag = np.eye(4)[np.arange(8) // 2]  # agnews_specific: client i holds class i // 2
    same_ag = (np.arange(8)[:, None] // 2) == (np.arange(8)[None, :] // 2)
    np.testing.assert_allclose(call(trust.oracle_trust, m_ag), same_ag / 2, rtol=1e-6)


def reference_top_peers(scores: np.ndarray, k: int) -> np.ndarray:
    """NumPy: per row, sort by (score descending, not self, index) and keep the first `k`."""
    n = len(scores)
    keep = np.zeros((n, n), bool)
    for i in range(n):
        order = sorted(range(n), key=lambda j: (-scores[i, j], j != i, j))
        keep[i, order[:k]] = True
    return keep


def test_top_peers_ties_go_to_self_then_lower_index():
    """An all-equal row with top_peers=3 keeps the client itself (issue: row 4 got {0, 1, 2})."""
    w = call(trust.softmax_trust, np.zeros((N, N)), top_peers=3)
    np.testing.assert_array_equal(w > 0, reference_top_peers(np.zeros((N, N)), 3))
    assert np.all(np.diag(w) > 0)
    np.testing.assert_allclose(w[4], [1 / 3, 1 / 3, 0, 0, 1 / 3], rtol=1e-6)
    rng = np.random.default_rng(0)
    for k in (1, 2, 3):
        for _ in range(5):
            scores = rng.integers(0, 3, (7, 7)).astype(np.float32)  # many ties
            w = call(trust.softmax_trust, scores, top_peers=k)
            np.testing.assert_array_equal(w > 0, reference_top_peers(scores, k))
            w = call(trust.softmax_trust, scores, threshold=5.0, min_keep=k)
            np.testing.assert_array_equal(w > 0, reference_top_peers(scores, k))


@pytest.mark.parametrize("name", sorted(trust.TOPOLOGIES))
def test_topology(name):
    for n in (1, 2, 5):
        adj = trust.topology(name, n)
        chex.assert_shape(adj, (n, n))
        assert adj.dtype == bool and np.all(np.diag(adj)) and np.array_equal(adj, adj.T)
    ring = trust.topology("ring", 5)
    assert ring.sum(axis=1).tolist() == [3] * 5 and ring[0, 4] and not ring[0, 2]
    star = trust.topology("star", 5)
    assert star[0].all() and star[:, 0].all() and star.sum() == 5 + 2 * 4


def test_unknown_topology():
    with pytest.raises(ValueError, match="unknown topology"):
        trust.topology("mesh", 3)
