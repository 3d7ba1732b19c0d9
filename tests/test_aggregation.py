"""One battery over every registered aggregator, plus the mixing primitives.

Every entry of `fedjax_lora.aggregation.AGGREGATORS` goes through the public battery
`fedjax_lora.aggregation.testing.check_aggregator` (shapes and dtypes, jit, row-stochastic mixing,
permutation equivariance) against a NumPy double-loop reference written here. A new aggregator
needs a `NUMPY_REFERENCES` entry. The battery itself is tested on deliberately broken rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_aggregation_trust import (
    np_oracle,
    np_prediction_scores,
    np_select_softmax,
    np_validation_scores,
    np_weight_scores,
)

from fedjax_lora import aggregation as agg
from fedjax_lora.aggregation.testing import check_aggregator, example_tree

N = 5


def np_fedavg_matrix(weights: np.ndarray) -> np.ndarray:
    p = np.asarray(weights, np.float64) / np.sum(weights)
    return np.array([[p[j] for j in range(len(p))] for _ in range(len(p))])


def np_holder_matrix(held: np.ndarray) -> np.ndarray:
    """Every client gets the mean over the holders: w[i, j] = held[j] / #holders."""
    return np.array([[held[j] / held.sum() for j in range(len(held))] for _ in range(len(held))])


def np_median(leaves, inputs):
    return [np.broadcast_to(np.median(x, axis=0), x.shape) for x in leaves]


def np_trimmed_mean(leaves, inputs, beta=0.2):
    """Per coordinate: sort the N values in a loop, drop floor(beta N) at each end, average."""
    out = []
    for x in leaves:
        n, flat = x.shape[0], x.reshape(x.shape[0], -1)
        b = int(beta * n)
        means = [np.mean(sorted(flat[:, k])[b : n - b]) for k in range(flat.shape[1])]
        out.append(np.broadcast_to(np.reshape(means, x.shape[1:]), x.shape))
    return out


def np_krum_matrix(leaves, f=1, m=1):
    """Blanchard et al. 2017: score = sum of the n - f - 2 smallest squared distances to others;
    the m lowest-scoring clients are averaged (m = None: n - f)."""
    n = leaves[0].shape[0]
    flat = np.concatenate([x.reshape(n, -1) for x in leaves], axis=1)
    scores = []
    for i in range(n):
        d = sorted(np.sum((flat[i] - flat[j]) ** 2) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    keep = n - f if m is None else m
    w = np.zeros((n, n))
    w[:, np.argsort(scores, kind="stable")[:keep]] = 1.0 / keep
    return w


# name -> (leaves, inputs) -> the mixing matrix the aggregator must use, in NumPy; or a list of
# matrices, one per leaf (in `example_tree`'s leaf order: lora_a, lora_b, router); for entries
# without the `mixing` property, the expected leaves. None: the rule's numbers are tested in its
# own module (server optimizers over several rounds in test_server_opt.py, DP noise statistically
# in test_dp.py); the battery still checks its declared properties.
NUMPY_REFERENCES: dict[
    str, Callable[[list[np.ndarray], dict[str, Any]], np.ndarray | list[np.ndarray]] | None
] = {
    "local": lambda leaves, inputs: np.eye(N),
    "fedavg": lambda leaves, inputs: np_fedavg_matrix(inputs["weights"]),
    "trust_weights": lambda leaves, inputs: np_select_softmax(np_weight_scores(leaves)),
    "trust_validation": lambda leaves, inputs: np_select_softmax(
        np_validation_scores(inputs["ppl"])
    ),
    "trust_prediction": lambda leaves, inputs: np_select_softmax(
        np_prediction_scores(inputs["logits"])
    ),
    "trust_oracle": lambda leaves, inputs: np_oracle(inputs["mixtures"]),
    "experts": lambda leaves, inputs: np_holder_matrix(inputs["holders"].astype(np.float64)),
    # CoMiGS `expert_0` policy: the shared LoRA (lora_a, lora_b) averaged, the router kept.
    "masked": lambda leaves, inputs: [np_fedavg_matrix(inputs["weights"])] * 2 + [np.eye(N)],
    "median": np_median,
    "trimmed_mean": np_trimmed_mean,
    "krum": lambda leaves, inputs: np_krum_matrix(leaves),
    "multi_krum": lambda leaves, inputs: np_krum_matrix(leaves, m=None),
    "fedavgm": None,
    "fedadam": None,
    "fedyogi": None,
    "fedadagrad": None,
    "dp_fedavg": None,
}


@pytest.mark.parametrize("name", sorted(agg.AGGREGATORS))
def test_registered_aggregator_passes_the_battery(name):
    assert name in NUMPY_REFERENCES, f"add a NumPy reference for the new aggregator {name!r}"
    entry = agg.AGGREGATORS[name]
    for seed in (0, 1):
        check_aggregator(
            entry.factory,
            NUMPY_REFERENCES[name],
            example_inputs=entry.example_inputs,
            num_clients=N,
            properties=entry.properties,
            seed=seed,
            name=name,
        )


def test_registry_inputs_are_documented():
    for name, entry in agg.AGGREGATORS.items():
        for key in entry.example_inputs(np.random.default_rng(0), N):
            assert key in agg.INPUT_CLIENT_AXES, f"{name}: document input {key!r}"


# ---------------------------------------------------------------- the battery catches bugs


def _matrix_rule(matrix_fn: Callable[[Any], jax.Array]) -> agg.Aggregator:
    """A test rule mixing with `matrix_fn(tree)`, reporting it in a `MixState`."""

    def apply(tree, state, inputs=None):
        w = matrix_fn(tree)
        return agg.mix(tree, w), agg.MixState(w)

    return agg.Aggregator(lambda tree: agg.MixState(jnp.eye(agg.num_clients(tree))), apply)


def _uniform(tree):
    return agg.fedavg_matrix(agg.num_clients(tree))


def np_uniform(leaves, inputs):
    return np.full((N, N), 1.0 / N)


def test_battery_accepts_a_correct_rule_given_as_an_aggregator():
    check_aggregator(_matrix_rule(_uniform), np_uniform)


def _upcast(tree, state, inputs=None):
    return jax.tree.map(
        lambda x: jnp.mean(x.astype(jnp.float32), 0, keepdims=True) + 0 * x.astype(jnp.float32),
        tree,
    ), state


def _overshoot(tree, state, inputs=None):  # a step beyond every client (like an unchecked server)
    return jax.tree.map(lambda x: 3 * x + 1, tree), state


def _first_client(tree):  # everyone copies client 0: row-stochastic, not equivariant
    return jnp.zeros((N, N)).at[:, 0].set(1.0)


def _python_branch(tree):  # Python control flow on a traced value
    x = jax.tree.leaves(tree)[0]
    return _uniform(tree) if float(x.sum()) > -1e9 else jnp.eye(N)


@pytest.mark.parametrize(
    ("aggregator", "reference", "prop"),
    [
        (agg.Aggregator(lambda t: (), _upcast), None, "shapes and dtypes"),
        (_matrix_rule(lambda t: 2.0 * jnp.eye(N)), None, "row-stochastic mixing"),
        (_matrix_rule(_first_client), None, "permutation equivariance"),
        (_matrix_rule(_python_branch), None, "jit"),
        (_matrix_rule(_uniform), lambda leaves, inputs: np.eye(N), "NumPy reference"),
        (agg.Aggregator(lambda t: (), _overshoot), None, "within_range"),
    ],
)
def test_battery_names_the_failed_property(aggregator, reference, prop):
    with pytest.raises(AssertionError, match=f"aggregator 'rule': {prop}"):
        check_aggregator(aggregator, reference, name="rule")


def test_battery_skips_equivariance_when_declared_and_validates_inputs():
    checked = check_aggregator(_matrix_rule(_first_client), properties={"mixing", "within_range"})
    assert "permutation_equivariant" not in checked and "within_range" in checked
    with pytest.raises(ValueError, match="unknown properties"):
        check_aggregator(_matrix_rule(_uniform), properties={"linear"})
    with pytest.raises(ValueError, match="input_client_axes"):
        check_aggregator(agg.fedavg_aggregator, example_inputs=lambda rng, n: {"sizes": np.ones(n)})
    check_aggregator(
        agg.fedavg_aggregator,
        example_inputs=lambda rng, n: {"weights": rng.uniform(1, 2, n)},
        input_client_axes={"weights": (0,)},
    )


# ---------------------------------------------------------------- primitives


def test_mix_computes_in_f32_and_keeps_dtype():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N, 4, 3)), jnp.bfloat16)
    w = rng.dirichlet(np.ones(N), N).astype(np.float32)
    got = jax.jit(agg.mix)({"x": x}, w)["x"]
    assert got.dtype == jnp.bfloat16
    want = np.einsum("ij,jkl->ikl", np.asarray(w, np.float64), np.asarray(x, np.float64))
    np.testing.assert_array_equal(got, want.astype(np.float32).astype(jnp.bfloat16))


def test_fedavg_every_client_gets_the_average():
    tree = example_tree(np.random.default_rng(0), N)
    counts = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    for weights, p in ((None, np.full(N, 1 / N)), (counts, counts / counts.sum())):
        out = jax.jit(agg.fedavg)(tree, weights)
        for got, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
            avg = np.tensordot(p, np.asarray(leaf, np.float64), axes=1)
            tol = 1e-2 if got.dtype == jnp.bfloat16 else 1e-5
            np.testing.assert_allclose(np.asarray(got, np.float64), np.stack([avg] * N), tol, tol)


def test_fedavg_aggregator_input_weights_override():
    tree = example_tree(np.random.default_rng(0), N)
    fixed = agg.fedavg_aggregator(np.ones(N))
    _, state = jax.jit(fixed.apply)(tree, fixed.init(tree), {"weights": np.arange(1.0, N + 1)})
    np.testing.assert_allclose(state.matrix[0], np.arange(1.0, N + 1) / 15, rtol=1e-6)


def test_local_is_identity():
    tree = example_tree(np.random.default_rng(0), N)
    assert agg.local(tree) is tree


def test_mix_nnx_state():
    """Adapters split from an NNX model (`nnx.State`) mix like any other pytree."""

    class Adapters(nnx.Module):
        def __init__(self) -> None:
            self.a = nnx.Param(jnp.arange(N * 2.0).reshape(N, 2))

    state = nnx.state(Adapters())
    out = jax.jit(agg.fedavg)(state)
    assert isinstance(out, nnx.State)
    np.testing.assert_allclose(out["a"][...], np.full((N, 2), [4.0, 5.0]), rtol=1e-6)


def test_trust_aggregator_validates_options():
    with pytest.raises(ValueError, match="unknown trust rule"):
        agg.trust_aggregator("gossip")
    with pytest.raises(TypeError):
        agg.trust_aggregator("validation", tempreature=2.0)
    with pytest.raises(ValueError, match="unknown aggregator"):
        agg.make_aggregator("fedprox")


def test_trust_aggregator_with_topology():
    tree = example_tree(np.random.default_rng(0), N)
    ring = agg.topology("ring", N)
    aggregator = agg.make_aggregator("trust_weights", adjacency=ring, temperature=0.5)
    _, state = jax.jit(aggregator.apply)(tree, aggregator.init(tree))
    w = np.asarray(state.matrix)
    assert np.all(w[~ring] == 0) and np.all(w[ring] > 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
