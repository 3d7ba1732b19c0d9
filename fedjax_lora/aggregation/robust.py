r"""Byzantine-robust reductions in place of the mean: coordinate-wise median, trimmed mean, Krum.

Each rule reduces the clients' global part (a mask policy of `aggregation.masks`, default `all`)
to one consensus tree that every client receives; local leaves are kept. Client weights
(`inputs["weights"]`) are ignored: robustness comes from not trusting any one client's claim.

- **Coordinate-wise median** (Yin et al., ICML 2018): :math:`\bar θ[k] = \mathrm{median}_j
  θ_j[k]` (the mean of the two middle values for even `N`, as `np.median`).
- **Trimmed mean** (Yin et al. 2018): per coordinate, sort the `N` values, drop the
  :math:`b = \lfloor β N \rfloor` smallest and largest, average the other `N − 2b`
  (`scipy.stats.trim_mean`'s convention); `0 ≤ β < 1/2`.
- **Krum / multi-Krum** (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS 2017): with `f` Byzantine clients out of `N > 2f + 2`, client `i`'s
  score is :math:`s(i) = \sum_{j \in \mathcal{N}_i} \lVert θ_i − θ_j \rVert^2` over its
  `N − f − 2` nearest other clients (distances over the whole global part); Krum selects the
  client of lowest score, multi-Krum averages the `m` lowest. Selection is a mixing matrix
  (`W[i, j] = 1/m` on the selected `j`), returned in `MixState.matrix`.

Median and trimmed mean are not mixings (each coordinate picks its own clients), so the
aggregator battery checks them against the reduced leaves rather than a matrix.

**Holders.** `inputs["present"]` (optional, a tree of bool arrays `[N, ...]` broadcastable to the
leaves) restricts median and trimmed mean, per coordinate, to the `h` clients holding it: the
median of those `h` values, the mean after dropping `⌊βh⌋` at each end; a coordinate nobody holds
is 0 (HetLoRA's zero-padded ranks: a rank few clients hold is their median, not pulled to the
zeros of the others). Krum ignores it: its distances over zero padding are well defined (a rank
one client lacks counts as its 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lora.aggregation.core import Aggregator, Inputs, MixState, mix, num_clients
from fedjax_lora.aggregation.masks import PolicyArg, global_mask, merge_global

__all__ = ["krum_aggregator", "krum_scores", "median_aggregator", "trimmed_mean_aggregator"]

PyTree = Any


def _coordinate_aggregator(
    reduce: Callable[[jax.Array], jax.Array],
    held: Callable[[jax.Array, jax.Array], jax.Array],
    policy: PolicyArg,
) -> Aggregator:
    """Every client receives `reduce(leaf)` (a reduction over the client axis, in f32) on the
    global part, or `held(leaf, present)` over the holders when `inputs["present"]` is given
    (module docstring); stateless."""
    global_mask(None, policy)  # fail early on an unknown policy

    def apply(stacked_tree: PyTree, state: tuple, inputs: Inputs | None = None):
        present = (inputs or {}).get("present")

        def reduce_leaf(leaf: jax.typing.ArrayLike, *mask: jax.Array) -> jax.Array:
            x = leaf.astype(jnp.float32)
            out = reduce(x) if not mask else held(x, jnp.broadcast_to(mask[0], leaf.shape))
            return jnp.broadcast_to(out, leaf.shape).astype(leaf.dtype)

        trees = (stacked_tree,) if present is None else (stacked_tree, present)
        return merge_global(stacked_tree, jax.tree.map(reduce_leaf, *trees), policy), state

    return Aggregator(lambda stacked_tree: (), apply)


def _held_median(x: jax.Array, present: jax.Array) -> jax.Array:
    out = jnp.nanmedian(jnp.where(present, x, jnp.nan), axis=0)
    return jnp.where(jnp.any(present, axis=0), out, 0.0)


def median_aggregator(policy: PolicyArg = "all") -> Aggregator:
    """Coordinate-wise median of the clients' global part (module docstring)."""
    return _coordinate_aggregator(lambda x: jnp.median(x, axis=0), _held_median, policy)


def trimmed_mean_aggregator(beta: float = 0.2, policy: PolicyArg = "all") -> Aggregator:
    """Coordinate-wise `β`-trimmed mean: drop `⌊βN⌋` values at each end, average the rest."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed mean: beta must be in [0, 0.5), got {beta}")

    def reduce(x: jax.typing.ArrayLike) -> jax.Array:
        b = int(beta * x.shape[0])
        return jnp.mean(jnp.sort(x, axis=0)[b : x.shape[0] - b], axis=0)

    def held(x: jax.Array, present: jax.Array) -> jax.Array:
        n = x.shape[0]
        h = jnp.sum(present, axis=0)
        b = jnp.asarray([int(beta * k) for k in range(n + 1)])[h]  # ⌊βh⌋, as `reduce` rounds
        ordered = jnp.sort(jnp.where(present, x, jnp.inf), axis=0)  # the holders' values first
        rank = jnp.arange(n).reshape((n,) + (1,) * (x.ndim - 1))
        kept = (rank >= b) & (rank < h - b)
        count = jnp.maximum(h - 2 * b, 1).astype(jnp.float32)
        return jnp.sum(jnp.where(kept, ordered, 0.0), axis=0) / count

    return _coordinate_aggregator(reduce, held, policy)


def krum_scores(stacked_tree: PyTree, f: int) -> jax.Array:
    r"""`f32[N]`: :math:`s(i) = \sum` of the `N − f − 2` smallest `‖θ_i − θ_j‖²`, `j ≠ i`, with
    the squared distances summed over all leaves (Blanchard et al. 2017)."""
    n = num_clients(stacked_tree)
    if not 2 * f + 2 < n:
        raise ValueError(f"Krum needs N > 2f + 2 clients; got N = {n}, f = {f} (lower f)")
    d2 = sum(
        jnp.sum((x[:, None] - x[None, :]) ** 2, axis=tuple(range(2, x.ndim + 1)), dtype=jnp.float32)
        for x in (leaf.astype(jnp.float32) for leaf in jax.tree.leaves(stacked_tree))
    )
    others = jnp.sort(jnp.where(jnp.eye(n, dtype=bool), jnp.inf, d2), axis=1)
    return jnp.sum(others[:, : n - f - 2], axis=1)


def krum_aggregator(f: int = 1, m: int | None = 1, policy: PolicyArg = "all") -> Aggregator:
    """Krum (`m = 1`) or multi-Krum (`m > 1`; `None`: `N − f`): every client receives the mean of
    the `m` clients of lowest `krum_scores` over the global part; `MixState.matrix` is that
    selection (`1/m` on the selected columns)."""
    if f < 0 or (m is not None and m < 1):
        raise ValueError(f"Krum: need f >= 0 and m >= 1 (or None), got f = {f}, m = {m}")
    global_mask(None, policy)

    def apply(stacked_tree: PyTree, state: MixState, inputs: Inputs | None = None):
        del state, inputs
        n = num_clients(stacked_tree)
        keep = n - f if m is None else m
        if keep > n:
            raise ValueError(f"multi-Krum: m = {keep} exceeds the {n} clients")
        masked = jax.tree.map(
            lambda leaf, mask: jnp.where(mask, leaf, 0),
            stacked_tree,
            global_mask(stacked_tree, policy),
        )
        order = jnp.argsort(krum_scores(masked, f), stable=True)
        selected = jnp.zeros(n, jnp.float32).at[order[:keep]].set(1.0 / keep)
        matrix = jnp.broadcast_to(selected, (n, n))
        return merge_global(stacked_tree, mix(stacked_tree, matrix), policy), MixState(matrix)

    return Aggregator(lambda tree: MixState(jnp.eye(num_clients(tree), dtype=jnp.float32)), apply)
