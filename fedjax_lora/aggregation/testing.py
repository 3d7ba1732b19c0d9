r"""`check_aggregator`: the property battery every aggregator must pass, for your own rules too.

An aggregator (`Aggregator(init, apply)` over stacked client trees, leaves `[N, ...]`) is checked
on a random stacked tree with f32 and bf16 leaves. Always:

- **runs**: `init` and `apply` run eagerly on the example;
- **shapes and dtypes**: `apply` returns a tree of the input's structure, shapes and dtypes, with
  finite values, and a state of `init`'s structure (so rounds can carry it through `lax.cond`);
- **jit**: `jax.jit(apply)` traces (no Python branching on values) and gives the eager numbers;
- **row-stochastic mixing**: a returned `MixState.matrix` is `[N, N]`, non-negative, rows sum to 1;
- **NumPy reference** (when given): the result equals an independent NumPy implementation (f64).

and the `properties` the rule declares (`PROPERTIES`; all of them by default, since every mixing
rule has them; a rule for which one does not hold by definition leaves it out):

- `permutation_equivariant`: relabelling the clients by `π` (tree and the client axes of the side
  inputs, `INPUT_CLIENT_AXES`) relabels the result, `apply(π·θ, π·inputs) = π·apply(θ, inputs)`
  (not for rules tied to client indices, e.g. a fixed ring);
- `mixing`: the result is a mixing `θ'_i = Σ_j W[i, j] θ_j` leaf by leaf, so the reference gives
  `W` (and a returned `MixState.matrix` equals it); without it the reference gives the expected
  leaves themselves (coordinate-wise median, trimmed mean, server optimizers);
- `within_range`: every coordinate of the result lies between the clients' smallest and largest
  value of it (convex combinations and robust reductions; not a server optimizer's step or added
  noise).

`check_aggregator` returns the names of the properties it checked. A failed property raises
`AssertionError` naming the aggregator, the property and the numbers. `tests/test_aggregation.py`
runs it over every registered aggregator (`AGGREGATORS`) with the properties its entry declares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lora.aggregation.core import INPUT_CLIENT_AXES, Aggregator, Inputs, MixState
from fedjax_lora.models.layers import Router
from fedjax_lora.typing import PyTree

__all__ = ["PROPERTIES", "Reference", "check_aggregator", "example_tree"]

Reference = Callable[[list[np.ndarray], dict[str, Any]], np.ndarray | list[np.ndarray]]
"""`reference(leaves, inputs)`: from the example's leaves (f64 NumPy `[N, ...]`, in
`jax.tree.leaves` order) and side inputs (NumPy), for a `mixing` rule the `[N, N]` mixing matrix
the aggregator must apply to every leaf, or a list of matrices, one per leaf; otherwise the list
of expected result leaves."""

PROPERTIES: tuple[str, ...] = ("permutation_equivariant", "mixing", "within_range")
"""The properties a rule may declare (module docstring); a mixing rule has all of them."""


def example_tree(rng: np.random.Generator, num_clients: int = 5) -> dict[str, Any]:
    """A stacked client tree with LoRA-like f32 leaves `lora_a [N, 6, 2]`, `lora_b [N, 2, 7]` and
    a bf16 `router [N, 3]`, a `Router` variable (the type the mask policies of
    `aggregation.masks` recognise: routers stay local under every policy but `all`)."""
    n = num_clients
    return {
        "lora_a": rng.uniform(-0.5, 0.5, (n, 6, 2)).astype(np.float32),
        "lora_b": rng.normal(size=(n, 2, 7)).astype(np.float32),
        "router": Router(jnp.asarray(rng.normal(size=(n, 3)), jnp.bfloat16)),
    }


@contextlib.contextmanager
def _property(label: str, prop: str) -> Iterator[None]:
    """Re-raises any failure inside as `AssertionError` naming the aggregator and the property."""
    try:
        yield
    except Exception as e:  # any failure inside is the property's failure
        raise AssertionError(f"aggregator {label}: {prop} failed: {type(e).__name__}: {e}") from e


def _tolerance(dtype: Any, rtol: float, atol: float) -> tuple[float, float]:
    return (1e-2, 1e-2) if dtype == jnp.bfloat16 else (rtol, atol)


def _assert_leaves_close(got: PyTree, want: list[np.ndarray], rtol: float, atol: float) -> None:
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), want, strict=True)):
        r, a = _tolerance(g.dtype, rtol, atol)
        np.testing.assert_allclose(
            np.asarray(g, np.float64), w, rtol=r, atol=a, err_msg=f"leaf {i}"
        )


def _permute_inputs(
    inputs: Mapping[str, Any], perm: np.ndarray, axes: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    def permute(value: Any, key: str) -> np.ndarray:
        value = np.asarray(value)
        for axis in axes[key]:
            value = np.take(value, perm, axis=axis)
        return value

    return {k: jax.tree.map(lambda v, k=k: permute(v, k), value) for k, value in inputs.items()}


def check_aggregator(
    aggregator_or_factory: Aggregator | Callable[[], Aggregator],
    reference: Reference | None = None,
    *,
    example_inputs: Callable[[np.random.Generator, int], Inputs] | None = None,
    tree: PyTree | None = None,
    num_clients: int = 5,
    properties: Collection[str] = PROPERTIES,
    input_client_axes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    name: str | None = None,
) -> tuple[str, ...]:
    """Checks the aggregator's properties (module docstring); raises `AssertionError` naming the
    first one that fails.

    aggregator_or_factory: an `Aggregator`, or a factory called without arguments.
    reference: an independent NumPy mixing matrix, or the expected leaves when the rule does not
      declare `mixing` (`Reference`); None skips that check.
    example_inputs: `(numpy_rng, num_clients) -> inputs`, random but valid side inputs (the
      registry's `AggregatorEntry.example_inputs`); None: the rule needs none.
    tree: the stacked client tree to aggregate; default `example_tree(rng, num_clients)`.
    properties: which of `PROPERTIES` hold for the rule (default all); e.g. leave out
      `permutation_equivariant` for a ring topology given by client index.
    input_client_axes: which axes of extra side inputs index clients, added to
      `INPUT_CLIENT_AXES` (needed for the permutation check).
    rtol, atol: tolerances for f32 leaves (bf16 leaves: 1e-2).

    Returns the names of the properties checked, in order.
    """
    unknown_properties = sorted(set(properties) - set(PROPERTIES))
    if unknown_properties:
        raise ValueError(
            f"unknown properties {unknown_properties}; expected a subset of {sorted(PROPERTIES)}"
        )
    permutation_equivariant = "permutation_equivariant" in properties
    if isinstance(aggregator_or_factory, Aggregator):
        aggregator = aggregator_or_factory
    elif callable(aggregator_or_factory):
        aggregator = aggregator_or_factory()
    else:
        raise ValueError(
            "check_aggregator needs an Aggregator or a factory returning one, got "
            f"{type(aggregator_or_factory).__name__}"
        )
    label = repr(name or getattr(aggregator_or_factory, "__name__", "aggregator"))
    rng = np.random.default_rng(seed)
    if tree is None:
        tree = example_tree(rng, num_clients)
    n = {leaf.shape[0] for leaf in jax.tree.leaves(tree)}
    if len(n) != 1:
        raise ValueError(f"tree leaves must share the leading client axis, got sizes {sorted(n)}")
    n = n.pop()
    inputs = dict(example_inputs(rng, n)) if example_inputs is not None else {}
    axes = {**INPUT_CLIENT_AXES, **(input_client_axes or {})}
    unknown = sorted(set(inputs) - set(axes))
    if unknown and permutation_equivariant:
        raise ValueError(
            f"side inputs {unknown} have no client axes; pass input_client_axes={{name: (axes,)}} "
            "(or leave permutation_equivariant out of properties)"
        )

    checked = ["runs", "shapes and dtypes", "jit"]
    with _property(label, "runs (init and apply, eager)"):
        state = aggregator.init(tree)
        eager = aggregator.apply(tree, state, inputs)
        new_tree, new_state = eager

    with _property(label, "shapes and dtypes"):
        chex.assert_trees_all_equal_shapes_and_dtypes(new_tree, tree)
        chex.assert_tree_all_finite(new_tree)
        chex.assert_trees_all_equal_structs(new_state, state)

    apply = jax.jit(aggregator.apply)
    with _property(label, "jit (traces and matches eager)"):
        chex.assert_trees_all_close(apply(tree, state, inputs), eager, rtol=rtol, atol=atol)

    if isinstance(new_state, MixState):
        checked.append("row-stochastic mixing")
        with _property(label, "row-stochastic mixing"):
            w = np.asarray(new_state.matrix, np.float64)
            chex.assert_shape(w, (n, n))
            assert np.all(w >= 0), f"negative weights in the mixing matrix:\n{w}"
            np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5, err_msg="row sums")

    if "within_range" in properties:
        checked.append("within_range")
        with _property(label, "within_range"):
            pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(new_tree), strict=True)
            for i, (x, y) in enumerate(pairs):
                r, a = _tolerance(y.dtype, rtol, atol)
                x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
                slack = a + r * np.abs(x).max()
                assert np.all(y >= x.min(axis=0) - slack), f"leaf {i} below the clients' minimum"
                assert np.all(y <= x.max(axis=0) + slack), f"leaf {i} above the clients' maximum"

    if permutation_equivariant:
        checked.append("permutation_equivariant")
        with _property(label, "permutation equivariance"):
            perm = rng.permutation(n)
            got, _ = apply(
                jax.tree.map(lambda x: x[perm], tree), state, _permute_inputs(inputs, perm, axes)
            )
            want = [np.asarray(x, np.float64)[perm] for x in jax.tree.leaves(new_tree)]
            _assert_leaves_close(got, want, max(rtol, 1e-4), max(atol, 1e-5))

    if reference is not None:
        mixing = "mixing" in properties
        checked.append(f"NumPy reference ({'mixing matrix' if mixing else 'result leaves'})")
        with _property(label, "NumPy reference"):
            leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
            want = reference(leaves, jax.tree.map(np.asarray, inputs))
            if mixing:
                per_leaf = want if isinstance(want, list) else [want] * len(leaves)
                if isinstance(new_state, MixState) and not isinstance(want, list):
                    np.testing.assert_allclose(
                        new_state.matrix, want, rtol=rtol, atol=atol, err_msg="mixing matrix"
                    )
                want = [
                    np.einsum("ij,j...->i...", wl, x)
                    for wl, x in zip(per_leaf, leaves, strict=True)
                ]
            _assert_leaves_close(new_tree, want, rtol, atol)
    return tuple(checked)
