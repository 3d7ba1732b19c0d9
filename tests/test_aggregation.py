"""One battery over every registered aggregator, plus the mixing primitives.

Every entry of `fedjax_lora.aggregation.AGGREGATORS` must keep shapes and dtypes, be equivariant to
permuting clients, mix with a row-stochastic matrix, match a NumPy double-loop reference written
here, and give the same numbers under jit. A new aggregator needs a `NUMPY_REFERENCES` entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
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

N = 5


def stacked_tree(rng: np.random.Generator, n: int = N) -> dict[str, Any]:
    return {
        "lora_a": rng.uniform(-0.5, 0.5, (n, 6, 2)).astype(np.float32),
        "lora_b": rng.normal(size=(n, 2, 7)).astype(np.float32),
        "router": jnp.asarray(rng.normal(size=(n, 3)), jnp.bfloat16),
    }


def np_mix(leaves: list[np.ndarray], w: np.ndarray) -> list[np.ndarray]:
    """out[i] = sum_j w[i, j] * leaf[j], as a plain double loop in float64."""
    out = []
    for leaf in leaves:
        leaf = np.asarray(leaf, np.float64)
        new = np.zeros_like(leaf)
        for i in range(leaf.shape[0]):
            for j in range(leaf.shape[0]):
                new[i] += w[i, j] * leaf[j]
        out.append(new)
    return out


def np_fedavg_matrix(weights: np.ndarray) -> np.ndarray:
    p = np.asarray(weights, np.float64) / np.sum(weights)
    return np.array([[p[j] for j in range(len(p))] for _ in range(len(p))])


def np_holder_matrix(held: np.ndarray) -> np.ndarray:
    """Every client gets the mean over the holders: w[i, j] = held[j] / #holders."""
    return np.array([[held[j] / held.sum() for j in range(len(held))] for _ in range(len(held))])


# name -> (leaves, inputs) -> the mixing matrix the aggregator must use, in NumPy; or a list of
# matrices, one per leaf (in `stacked_tree`'s leaf order: lora_a, lora_b, router).
NUMPY_REFERENCES: dict[
    str, Callable[[list[np.ndarray], dict[str, Any]], np.ndarray | list[np.ndarray]]
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
}


@functools.cache
def jitted_apply(name: str) -> Callable:
    """One compiled `apply` per aggregator, shared by the tests (all use the same shapes)."""
    return jax.jit(agg.AGGREGATORS[name].factory().apply)


def run(name: str, tree: Any, inputs: dict[str, Any]) -> tuple[Any, Any]:
    aggregator = agg.AGGREGATORS[name].factory()
    return jitted_apply(name)(tree, aggregator.init(tree), inputs)


def example(name: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return stacked_tree(rng), dict(agg.AGGREGATORS[name].example_inputs(rng, N))


def permute_inputs(inputs: dict[str, Any], perm: np.ndarray) -> dict[str, Any]:
    out = {}
    for key, value in inputs.items():
        value = np.asarray(value)
        for axis in agg.INPUT_CLIENT_AXES[key]:
            value = np.take(value, perm, axis=axis)
        out[key] = value
    return out


BATTERY = sorted(agg.AGGREGATORS)


@pytest.mark.parametrize("name", BATTERY)
def test_keeps_shapes_and_dtypes(name):
    tree, inputs = example(name)
    new_tree, state = run(name, tree, inputs)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_tree, tree)
    chex.assert_tree_all_finite(new_tree)
    chex.assert_trees_all_equal_structs(state, agg.AGGREGATORS[name].factory().init(tree))


@pytest.mark.parametrize("name", BATTERY)
def test_mixing_matrix_row_stochastic(name):
    tree, inputs = example(name, seed=1)
    _, state = run(name, tree, inputs)
    if isinstance(state, agg.MixState):
        w = np.asarray(state.matrix)
        chex.assert_shape(w, (N, N))
        assert np.all(w >= 0)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", BATTERY)
def test_matches_numpy_reference(name):
    assert name in NUMPY_REFERENCES, f"add a NumPy reference for the new aggregator {name!r}"
    tree, inputs = example(name, seed=2)
    new_tree, state = run(name, tree, inputs)
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    w = NUMPY_REFERENCES[name](leaves, {k: np.asarray(v) for k, v in inputs.items()})
    if isinstance(state, agg.MixState):
        np.testing.assert_allclose(state.matrix, w, rtol=1e-5, atol=1e-6)
    per_leaf = w if isinstance(w, list) else [w] * len(leaves)
    wants = [np_mix([leaf], w_leaf)[0] for leaf, w_leaf in zip(leaves, per_leaf, strict=True)]
    for got, want, leaf in zip(jax.tree.leaves(new_tree), wants, leaves, strict=True):
        tol = 1e-2 if got.dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
        assert leaf.shape == want.shape


@pytest.mark.parametrize("name", BATTERY)
def test_permutation_equivariant(name):
    tree, inputs = example(name, seed=3)
    perm = np.random.default_rng(0).permutation(N)
    new_tree, _ = run(name, tree, inputs)
    tree_p = jax.tree.map(lambda x: x[perm], tree)
    new_tree_p, _ = run(name, tree_p, permute_inputs(inputs, perm))
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), new_tree_p),
        jax.tree.map(lambda x: x[perm].astype(jnp.float32), new_tree),
        rtol=1e-2 if name != "local" else 0,
        atol=1e-5,
    )


@pytest.mark.parametrize("name", BATTERY)
def test_jit_matches_eager(name):
    tree, inputs = example(name, seed=4)
    aggregator = agg.AGGREGATORS[name].factory()
    eager = aggregator.apply(tree, aggregator.init(tree), inputs)
    chex.assert_trees_all_close(run(name, tree, inputs), eager, rtol=1e-5, atol=1e-6)


def test_registry_inputs_are_documented():
    for name, entry in agg.AGGREGATORS.items():
        for key in entry.example_inputs(np.random.default_rng(0), N):
            assert key in agg.INPUT_CLIENT_AXES, f"{name}: document input {key!r}"


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
    tree = stacked_tree(np.random.default_rng(0))
    counts = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    for weights, p in ((None, np.full(N, 1 / N)), (counts, counts / counts.sum())):
        out = jax.jit(agg.fedavg)(tree, weights)
        for got, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
            avg = np.tensordot(p, np.asarray(leaf, np.float64), axes=1)
            tol = 1e-2 if got.dtype == jnp.bfloat16 else 1e-5
            np.testing.assert_allclose(np.asarray(got, np.float64), np.stack([avg] * N), tol, tol)


def test_fedavg_aggregator_input_weights_override():
    tree = stacked_tree(np.random.default_rng(0))
    fixed = agg.fedavg_aggregator(np.ones(N))
    _, state = jax.jit(fixed.apply)(tree, fixed.init(tree), {"weights": np.arange(1.0, N + 1)})
    np.testing.assert_allclose(state.matrix[0], np.arange(1.0, N + 1) / 15, rtol=1e-6)


def test_local_is_identity():
    tree = stacked_tree(np.random.default_rng(0))
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
    tree = stacked_tree(np.random.default_rng(0))
    ring = agg.topology("ring", N)
    aggregator = agg.make_aggregator("trust_weights", adjacency=ring, temperature=0.5)
    _, state = jax.jit(aggregator.apply)(tree, aggregator.init(tree))
    w = np.asarray(state.matrix)
    assert np.all(w[~ring] == 0) and np.all(w[ring] > 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
