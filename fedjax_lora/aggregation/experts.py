r"""Aggregation of a heterogeneous expert pool: each parameter averaged over the clients holding it.

FedAMoLE (Zhang et al., arXiv:2411.19128; reference `node.py::Server.aggregate`): with `X[c, e] = 1`
when client `c` holds domain expert `e` of a module, every domain expert is the unweighted mean over
its holders, and the shared expert and `W_tok` (held by everyone) the mean over all clients,

.. math:: \theta_e \leftarrow \frac{\sum_c X_{c,e}\, \theta_{c,e}}{\sum_c X_{c,e}},

broadcast back to every client (the new global pool). A parameter nobody holds keeps every
client's own value. `A` and `B` are averaged separately (not `BA`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jaxtyping import Array, Shaped

from fedjax_lora.aggregation.core import Aggregator, Inputs
from fedjax_lora.typing import PyTree

__all__ = ["expert_aggregator", "holder_average"]


def _average_leaf(
    held: Shaped[ArrayLike, "n ..."], leaf: Shaped[ArrayLike, "n ..."]
) -> Shaped[Array, "n ..."]:
    h = jnp.asarray(held, jnp.float32)
    h = h.reshape(h.shape + (1,) * (leaf.ndim - h.ndim))
    x = leaf.astype(jnp.float32)
    count = h.sum(0)
    mean = (h * x).sum(0) / jnp.maximum(count, 1.0)
    return jnp.where(count > 0, mean[None], x).astype(leaf.dtype)


def holder_average(stacked_tree: PyTree, holders: PyTree) -> PyTree:
    r"""Every client receives `Σ_c h[c] θ_c / Σ_c h[c]` (elementwise over the holder mask's axes).

    holders: a pytree prefix of `stacked_tree` whose leaves are 0/1 masks `[N, *lead]` over the
    leading axes of the matching leaves `[N, *lead, ...]`: `[N, E]` for a stacked expert pool
    `[N, E, in, r]`, `[N]` for a parameter held as a whole (a single `[N]` array applies to every
    leaf). Where no client holds a slice, every client keeps its own value. Computed in f32; every
    leaf keeps its dtype.
    """
    return jax.tree.map(
        lambda h, sub: jax.tree.map(lambda leaf: _average_leaf(h, leaf), sub), holders, stacked_tree
    )


def expert_aggregator() -> Aggregator:
    """`holder_average` with `inputs["holders"]` (FedAMoLE builds them with
    `fedjax_lora.amole.holders`); stateless."""

    def init(stacked_tree: PyTree) -> tuple:
        del stacked_tree
        return ()

    def apply(stacked_tree: PyTree, state: tuple, inputs: Inputs | None = None):
        return holder_average(stacked_tree, (inputs or {})["holders"]), state

    return Aggregator(init, apply)
