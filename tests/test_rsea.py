"""RSEA (FedAMoLE's expert assignment) against brute-force enumeration and NumPy loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedjax_lora.aggregation import rsea


def brute_force(P: np.ndarray, k: int, lo: int, hi: int) -> tuple[float, np.ndarray] | None:
    """Best `(value, X)` over every 0/1 matrix whose rows pick exactly k clients, or None."""
    e, c = P.shape
    best = None
    for rows in itertools.product(itertools.combinations(range(c), k), repeat=e):
        X = np.zeros((e, c), bool)
        for i, chosen in enumerate(rows):
            X[i, list(chosen)] = True
        held = X.sum(axis=0)
        if np.all(held >= lo) and np.all(held <= hi):
            value = float(np.sum(P * X))
            if best is None or value > best[0]:
                best = (value, X)
    return best


def assert_valid(X: np.ndarray, k: int, lo: int, hi: int) -> None:
    assert X.dtype == bool
    assert np.all(X.sum(axis=1) == k)
    assert np.all((X.sum(axis=0) >= lo) & (X.sum(axis=0) <= hi))


INSTANCES = [  # (E, C, clients_per_expert, min_experts, max_experts)
    (4, 3, 2, 2, 3),
    (5, 4, 2, 2, 3),
    (5, 3, 1, 1, 2),
    (3, 4, 2, 1, 2),
    (4, 4, 3, 2, 4),
    (6, 3, 1, 2, 2),
]


@pytest.mark.parametrize("instance", INSTANCES)
def test_assign_reaches_the_brute_force_optimum(instance):
    e, c, k, lo, hi = instance
    rng = np.random.default_rng(sum(instance))
    for trial in range(3):
        P = rng.uniform(size=(e, c)) if trial else rng.integers(0, 3, (e, c)).astype(float)  # ties
        X = rsea.assign(P, k, lo, hi)
        assert_valid(X, k, lo, hi)
        value, _ = brute_force(P, k, lo, hi)
        np.testing.assert_allclose(np.sum(P * X), value, rtol=1e-12, atol=1e-12)


def test_feasibility_condition_matches_enumeration():
    """`check_feasible` accepts exactly the parameters for which some assignment exists."""
    for e, c in itertools.product(range(1, 4), range(1, 4)):
        for k, lo in itertools.product(range(c + 1), range(4)):
            for hi in range(lo, 5):
                exists = brute_force(np.zeros((e, c)), k, lo, hi) is not None
                try:
                    rsea.check_feasible(e, c, k, lo, hi)
                    feasible = True
                except ValueError:
                    feasible = False
                assert feasible == exists, (e, c, k, lo, hi)


@pytest.mark.parametrize(
    ("shape", "k", "lo", "hi", "message"),
    [
        ((30, 50), 2, 2, 8, "C·min_experts = 50·2 = 100 exceeds E·clients_per_expert"),
        ((30, 10), 4, 2, 8, "E·clients_per_expert = 30·4 = 120 exceeds C·min"),
        ((30, 10), 11, 2, 40, "clients_per_expert=11 must lie in"),
        ((30, 10), 2, 5, 4, "min_experts <= max_experts"),
    ],
)
def test_infeasible_raises_naming_the_condition(shape, k, lo, hi, message):
    with pytest.raises(ValueError, match=message):
        rsea.assign(np.zeros(shape), k, lo, hi)


def test_paper_sized_instances_are_valid_and_deterministic():
    rng = np.random.default_rng(0)
    for e, c, k, lo, hi in [(30, 10, 2, 2, 8), (30, 10, 2, 6, 6), (30, 50, 4, 2, 8)]:
        P = rng.dirichlet(np.ones(c), e)
        X = rsea.assign(P, k, lo, hi)
        assert_valid(X, k, lo, hi)
        np.testing.assert_array_equal(rsea.assign(P.copy(), k, lo, hi), X)
        # Optimality certificate without enumeration: no single swap of one expert's client helps.
        held = X.sum(axis=0)
        for i, j_out, j_in in itertools.product(range(e), range(c), range(c)):
            if X[i, j_out] and not X[i, j_in] and held[j_out] > lo and held[j_in] < hi:
                assert P[i, j_in] <= P[i, j_out] + 1e-12


def test_random_assignment_is_feasible_and_seeded():
    first = rsea.random_assignment(np.random.default_rng(3), 30, 10, 2, 2, 8)
    again = rsea.random_assignment(np.random.default_rng(3), 30, 10, 2, 2, 8)
    other = rsea.random_assignment(np.random.default_rng(4), 30, 10, 2, 2, 8)
    assert_valid(first, 2, 2, 8)
    np.testing.assert_array_equal(first, again)
    assert np.any(first != other)


def test_scores_match_a_numpy_loop():
    rng = np.random.default_rng(0)
    c, e, r = 4, 5, 3
    t = rng.normal(size=(c, r))
    u = rng.normal(size=(c, e, r))
    held = rng.uniform(size=(c, e)) < 0.5
    held[:, 0] = False  # an expert nobody holds: key 0, uniform preferences
    got = np.asarray(rsea.scores(t, u, held))
    want = np.zeros((e, c))
    for i in range(e):
        holders = [j for j in range(c) if held[j, i]]
        key = np.mean([u[j, i] for j in holders], axis=0) if holders else np.zeros(r)
        s = np.array([key @ t[j] / np.sqrt(r) for j in range(c)])
        want[i] = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)
