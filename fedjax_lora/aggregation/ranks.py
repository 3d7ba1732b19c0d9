r"""Heterogeneous LoRA ranks in stacked client trees, by zero-padding and masks.

A *ranked* LoRA is a module holding leaves `a [N, in, r_max]`, `b [N, r_max, out]` and
`rank_scale [N, r_max]` (`fedjax_lora.algorithms.lora_baselines.RankedLoRA`): client `i` uses the
ranks where `rank_scale_i > 0` (its first `r_i`; the value there is its LoRA scale `s_i`), so its
update is

.. math:: ΔW_i = A_i \,\mathrm{diag}(m_i)\, B_i = s_i\, A_{i,:,:r_i} B_{i,:r_i,:},

and the padded columns of `A_i` / rows of `B_i` are zero. Every other leaf of the tree (attention
LoRA of a fixed rank, ...) is a plain tensor. HetLoRA and FlexLoRA (`hetlora.py`, `flexlora.py`)
treat the ranked modules specially and average the other leaves uniformly.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from fedjax_lora.aggregation.masks import path_names
from fedjax_lora.typing import PyTree

__all__ = ["RANK_SCALE", "map_ranked", "truncate"]

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
