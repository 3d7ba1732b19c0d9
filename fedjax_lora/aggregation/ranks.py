r"""Heterogeneous LoRA ranks in stacked client trees, by zero-padding and masks.

A *ranked* LoRA is a module holding leaves `a [N, in, r_max]`, `b [N, r_max, out]` and
`rank_scale [N, r_max]` (`fedjax_lora.algorithms.lora_baselines.RankedLoRA`): client `i` uses the
ranks where `rank_scale_i > 0` (its first `r_i`; the value there is its LoRA scale `s_i`), so its
update is

.. math:: ΔW_i = A_i \,\mathrm{diag}(m_i)\, B_i = s_i\, A_{i,:,:r_i} B_{i,:r_i,:},

and the padded columns of `A_i` / rows of `B_i` are zero. Every other leaf of the tree (attention
LoRA of a fixed rank, ...) is a plain tensor. HetLoRA and FlexLoRA (`hetlora.py`, `flexlora.py`)
treat the ranked modules specially and average the other leaves uniformly.

**A global rule in place of their mean** (`rule_reduce`): a robust reduction or DP-FedAvg
(`robust.py`, `dp.py`, an `Aggregator`) reduces the *view* the server averages, one stacked tree
`{"ranked": {path: view(path, a, b, rank_scale)}, "rest": [the other leaves]}` (`ranked_view`:
HetLoRA's truncated factors, FlexLoRA's products `ΔW_i`), with `inputs["start"]` the same view of
the clients at the round start (the server's last output, kept in `RuledState.start`; DP measures
each client's update from it) and, optionally, `inputs["present"]` (which clients hold each
coordinate). The rule's consensus replaces the server's weighted mean; client weights (token
counts, sparsity weights) are not passed on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from fedjax_lora.aggregation.core import Aggregator
from fedjax_lora.aggregation.masks import path_names
from fedjax_lora.typing import PyTree

__all__ = [
    "RANK_SCALE",
    "RuledState",
    "from_view",
    "map_ranked",
    "ranked_view",
    "rule_reduce",
    "truncate",
]

RANK_SCALE = "rank_scale"
_RANKED = ("a", "b", RANK_SCALE)

RankedFn = Callable[[str, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def map_ranked(tree: PyTree, ranked: RankedFn, rest: PyTree | None = None) -> PyTree:
    """`tree` with every ranked module's `(a, b, rank_scale)` replaced by
    `ranked(path, a, b, rank_scale)` (`path`: the module's dotted path) and every other leaf by
    the leaf at the same place in `rest` (a tree of `tree`'s structure; default: kept)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = list(jax.tree.leaves(tree if rest is None else rest))
    modules: dict[tuple[str, ...], dict[str, int]] = {}
    for i, (path, _) in enumerate(flat):
        names = path_names(path)
        modules.setdefault(names[:-1], {})[names[-1]] = i
    for module, leaves in modules.items():
        if set(_RANKED) <= set(leaves):
            idx = [leaves[name] for name in _RANKED]
            new = ranked(".".join(module), *(flat[i][1] for i in idx))
            for i, value in zip(idx, new, strict=True):
                out[i] = value
    return jax.tree.unflatten(treedef, out)


def truncate(
    a: Float[Array, "n d_in r"], b: Float[Array, "n r d_out"], active: Bool[Array, "n r"]
) -> tuple[Float[Array, "n d_in r"], Float[Array, "n r d_out"]]:
    """Stacked factors `a [N, in, r]`, `b [N, r, out]` with the columns / rows of inactive ranks
    (`active bool [N, r]` False) set to zero: the truncation to each client's rank."""
    return (
        jnp.where(active[:, None, :], a, jnp.zeros((), a.dtype)),
        jnp.where(active[:, :, None], b, jnp.zeros((), b.dtype)),
    )


View = Callable[[str, jax.Array, jax.Array, jax.Array], PyTree]


class RuledState(NamedTuple):
    """The state of a HetLoRA or FlexLoRA server whose mean a global rule replaces: own: the
    server's own state; rule: the rule's; start: the clients' tree (adapters and rank scales) at
    the round start, the server's last output."""

    own: PyTree
    rule: PyTree
    start: PyTree


def ranked_view(tree: PyTree, view: View) -> dict:
    """`{"ranked": {path: view(path, a, b, rank_scale)}, "rest": [every other leaf, in order]}`:
    what a global rule reduces (module docstring); `from_view` puts a reduced `rest` back."""
    ranked = {}

    def collect(path, a, b, scale):
        ranked[path] = view(path, a, b, scale)
        return None, None, None

    marked = jax.tree.leaves(map_ranked(tree, collect), is_leaf=lambda x: x is None)
    return {"ranked": ranked, "rest": [x for x in marked if x is not None]}


def from_view(tree: PyTree, ranked: RankedFn, rest: list) -> PyTree:
    """`map_ranked(tree, ranked)` with every other leaf taken from `rest` (a `ranked_view`'s
    `rest`, e.g. a rule's consensus of it)."""
    marked = jax.tree.leaves(map_ranked(tree, lambda *_: (None,) * 3), is_leaf=lambda x: x is None)
    values = iter(rest)
    leaves = [x if x is None else next(values) for x in marked]
    kept = [x if v is None else v for x, v in zip(jax.tree.leaves(tree), leaves, strict=True)]
    return map_ranked(tree, ranked, jax.tree.unflatten(jax.tree.structure(tree), kept))


def rule_reduce(
    rule: Aggregator,
    tree: PyTree,
    state: RuledState,
    view: View,
    present: View | None = None,
) -> tuple[dict, PyTree]:
    """`(consensus, rule_state)`: `rule` over `ranked_view(tree, view)` with `inputs["start"]`
    the view of `state.start` and `inputs["present"]` the view `present` (bool masks; every other
    leaf held by all), when given; `consensus` has `ranked_view`'s layout, one row per client."""
    inputs = {"start": ranked_view(state.start, view)}
    if present is not None:
        held = ranked_view(tree, present)
        everyone = lambda x: jnp.ones((x.shape[0],) + (1,) * (x.ndim - 1), bool)
        inputs["present"] = {"ranked": held["ranked"], "rest": jax.tree.map(everyone, held["rest"])}
    return rule.apply(ranked_view(tree, view), state.rule, inputs)
