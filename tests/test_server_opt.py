"""Server optimizers (Reddi et al. 2021) against NumPy loops of the optax formulas, over several
rounds with the state carried; the FedAvg identities; composition with a mask policy."""

from __future__ import annotations

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lora import aggregation as agg
from fedjax_lora.aggregation.masks import masked_aggregator
from fedjax_lora.aggregation.server_opt import (
    fedadagrad,
    fedadam,
    fedavgm,
    fedyogi,
    server_optimizer,
)

N, ROUNDS = 4, 4


def _tree(rng):
    return {"lora": {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(2, 5))}}


def _rounds(aggregator, seed=0, weights=None):
    """Runs ROUNDS rounds: each client starts from what it received and moves by a random delta
    (a stand-in for local training). Returns the start (f64), the deltas and every output."""
    rng = np.random.default_rng(seed)
    start = jax.tree.map(
        lambda x: np.broadcast_to(x, (N,) + x.shape).astype(np.float32), _tree(rng)
    )
    deltas = [
        jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), start)
        for _ in range(ROUNDS)
    ]
    apply = jax.jit(aggregator.apply)
    state, received, outs = aggregator.init(start), start, []
    for d in deltas:
        inputs = None if weights is None else {"weights": weights}
        received, state = apply(jax.tree.map(np.add, received, d), state, inputs)
        outs.append(received)
    return start, deltas, outs


def _np_server(step, start, deltas, weights=None):
    """θ ← θ + step(−Δ) leaf by leaf with Δ = Σ_i p_i (θ + δ_i) − θ = Σ_i p_i δ_i (f64)."""
    p = np.full(N, 1 / N) if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    leaves = [np.asarray(x, np.float64)[0] for x in jax.tree.leaves(start)]
    states = [None] * len(leaves)
    outs = []
    for t, d in enumerate(deltas, start=1):
        new = []
        for k, (theta, dk) in enumerate(zip(leaves, jax.tree.leaves(d), strict=True)):
            g = -np.tensordot(p, np.asarray(dk, np.float64), axes=1)
            update, states[k] = step(g, states[k], t)
            new.append(theta + update)
        leaves = new
        outs.append(leaves)
    return outs


def np_sgd(lr, momentum):
    def step(g, m, t):
        m = g if m is None else g + momentum * m  # optax.trace
        return -lr * m, m

    return step


def np_adam(lr, b1, b2, eps):
    def step(g, s, t):
        m, v = s or (0.0, 0.0)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        return -lr * m_hat / (np.sqrt(v_hat) + eps), (m, v)

    return step


def np_yogi(lr, b1, b2, eps):
    def step(g, s, t):
        m, v = s or (1e-6, 1e-6)  # optax's initial accumulator for both moments
        m = b1 * m + (1 - b1) * g
        v = v - (1 - b2) * np.sign(v - g**2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        return -lr * m_hat / (np.sqrt(v_hat) + eps), (m, v)

    return step


def np_adagrad(lr, eps):
    def step(g, s, t):
        s = (eps**2 if s is None else s) + g**2  # Reddi et al.: v_{-1} = τ²
        return -lr * g / np.sqrt(s), s

    return step


@pytest.mark.parametrize(
    ("factory", "step"),
    [
        (lambda: fedavgm(0.7, 0.9), np_sgd(0.7, 0.9)),
        (lambda: fedadam(0.05, 0.9, 0.99, 1e-3), np_adam(0.05, 0.9, 0.99, 1e-3)),
        (lambda: fedyogi(0.05, 0.9, 0.99, 1e-3), np_yogi(0.05, 0.9, 0.99, 1e-3)),
        (lambda: fedadagrad(0.1, 1e-3), np_adagrad(0.1, 1e-3)),
    ],
    ids=["fedavgm", "fedadam", "fedyogi", "fedadagrad"],
)
def test_server_optimizer_matches_numpy_over_rounds(factory, step):
    start, deltas, outs = _rounds(factory())
    for t, (got, want) in enumerate(zip(outs, _np_server(step, start, deltas), strict=True)):
        for g, w in zip(jax.tree.leaves(got), want, strict=True):
            np.testing.assert_allclose(
                g, np.broadcast_to(w, g.shape), rtol=1e-4, atol=1e-5, err_msg=f"round {t + 1}"
            )


def test_sgd_one_without_momentum_is_fedavg_exactly():
    weights = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    _, _, plain = _rounds(agg.fedavg_aggregator(), weights=weights)
    for aggregator in (server_optimizer(agg.fedavg_aggregator(), optax.sgd(1.0)), fedavgm(1.0, 0)):
        _, _, outs = _rounds(aggregator, weights=weights)
        for got, want in zip(outs, plain, strict=True):
            chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)  # f32 rounding only


def test_fedadam_first_step_is_sign_like_not_fedavg():
    """Bias-corrected Adam's first step is θ + η Δ / (|Δ| + τ): about η per coordinate."""
    lr, eps = 0.05, 1e-3
    start, deltas, outs = _rounds(fedadam(lr, eps=eps))
    for got, s, d in zip(
        jax.tree.leaves(outs[0]), jax.tree.leaves(start), jax.tree.leaves(deltas[0]), strict=True
    ):
        mean = np.asarray(d, np.float64).mean(0)
        want = np.asarray(s, np.float64)[0] + lr * mean / (np.abs(mean) + eps)
        np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "aggregator",
    [
        server_optimizer(
            masked_aggregator("fedsa"), optax.adam(0.05, 0.9, 0.99, 1e-3), policy="fedsa"
        ),
        fedadam(0.05, policy="fedsa"),  # the default inner rule averages the global part only
    ],
    ids=["explicit", "default_inner"],
)
def test_server_optimizer_only_steps_the_global_part(aggregator):
    """FedSA-LoRA: `a` global through the server optimizer, each client's `b` its own."""
    start, deltas, outs = _rounds(aggregator)
    want = _np_server(np_adam(0.05, 0.9, 0.99, 1e-3), start, deltas)
    b = np.asarray(start["lora"]["b"], np.float64)
    for t, got in enumerate(outs):
        np.testing.assert_allclose(
            got["lora"]["a"], np.broadcast_to(want[t][0], (N, 3, 2)), rtol=1e-4, atol=1e-5
        )
        b = b + np.asarray(deltas[t]["lora"]["b"], np.float64)  # local: kept, never averaged
        np.testing.assert_allclose(got["lora"]["b"], b, rtol=1e-5, atol=1e-5)


def test_state_is_carried_and_checkpointable():
    aggregator = fedadam()
    start, _, _ = _rounds(aggregator)
    state = aggregator.init(start)
    assert isinstance(state, agg.ServerOptState)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
