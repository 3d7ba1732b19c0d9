r"""Aggregation of stacked client trees: mixing, FedAvg, local, and the `Aggregator` protocol.

A *stacked client tree* is any pytree whose leaves have a leading client axis `N`. Aggregation in
personalized collaborative fine-tuning (Wagner, Fan & Jaggi, "Personalized Collaborative
Fine-Tuning for On-Device LLMs", COLM 2024, arXiv:2404.09753) is model averaging with a
row-stochastic matrix `W`, applied to every adapter tensor separately (A and B, not BA):

.. math:: \theta_i \leftarrow \sum_j W[i, j]\, \theta_j \quad \text{for all } i \text{ at once}.

An `Aggregator` is an optax-style pair of pure functions: `init(stacked_tree) -> state` and
`apply(stacked_tree, state, inputs=None) -> (new_stacked_tree, new_state)`, where `inputs` maps
names to per-round side information (see `INPUT_CLIENT_AXES`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Real

from fedjax_lora.aggregation import trust
from fedjax_lora.typing import PyTree

__all__ = [
    "INPUT_CLIENT_AXES",
    "TRUST_RULES",
    "Aggregator",
    "Inputs",
    "MixState",
    "fedavg",
    "fedavg_aggregator",
    "fedavg_matrix",
    "local",
    "local_aggregator",
    "mix",
    "num_clients",
    "trust_aggregator",
]

Inputs = Mapping[str, Any]

INPUT_CLIENT_AXES: dict[str, tuple[int, ...]] = {
    "weights": (0,),
    "ppl": (0, 1),
    "logits": (0,),
    "mixtures": (0,),
    "holders": (0,),
    "global": (),
}
"""Known side inputs of `Aggregator.apply` and which of their axes index clients.

- `weights: [N]`: per-client aggregation weights, e.g. training token counts (FedAvg).
- `ppl: [N, N]`: `ppl[i, j]` = perplexity of client `j`'s model on client `i`'s validation data.
- `logits: [N, S, V]`: client `j`'s last-position logits on `S` shared reference windows.
- `mixtures: [N, K]`: each client's share (or token count) of each of `K` data domains.
- `holders`: 0/1 masks `[N, ...]`, a pytree prefix of the tree: which clients hold which part.
- `global`: the global tree the clients received this round (no client axis); passed by
  `server_optimizer` to its inner rule (a DP rule clips the client updates relative to it).
"""


class InitFn(Protocol):
    def __call__(self, stacked_tree: PyTree) -> PyTree: ...


class ApplyFn(Protocol):
    def __call__(
        self, stacked_tree: PyTree, state: PyTree, inputs: Inputs | None = None
    ) -> tuple[PyTree, PyTree]: ...


class Aggregator(NamedTuple):
    """A server rule as a pair of pure, jittable functions (optax's `GradientTransformation`).

    init: `init(stacked_tree) -> state`.
    apply: `apply(stacked_tree, state, inputs=None) -> (new_stacked_tree, new_state)`; `inputs`
      is a mapping of side information (`INPUT_CLIENT_AXES`), `None` when the rule needs none.
    """

    init: InitFn
    apply: ApplyFn


class MixState(NamedTuple):
    """State of the matrix-based aggregators.

    matrix: `f32[N, N]`, the row-stochastic matrix used by the last `apply` (identity after
      `init`); kept for logging trust heatmaps.
    """

    matrix: Float[Array, "n n"]


def num_clients(stacked_tree: PyTree) -> int:
    """The leading (client) axis size shared by all leaves."""
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(stacked_tree)}
    if len(sizes) != 1:
        raise ValueError(f"leaves disagree on the client axis (or tree is empty): {sorted(sizes)}")
    return sizes.pop()


def mix(stacked_tree: PyTree, matrix: Real[ArrayLike, "n n"]) -> PyTree:
    r"""`θ_i ← Σ_j W[i, j] θ_j` on every leaf: `einsum('ij,j...->i...', W, leaf)`.

    Computed in f32 at full matmul precision; every leaf keeps its dtype. `W` is `[N, N]`, normally
    row-stochastic (then each new leaf is a convex combination of the old ones).
    """
    w = jnp.asarray(matrix, jnp.float32)

    def mix_leaf(leaf: ArrayLike) -> jax.Array:
        out = jnp.einsum(
            "ij,j...->i...", w, leaf.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        return out.astype(leaf.dtype)

    return jax.tree.map(mix_leaf, stacked_tree)


def fedavg_matrix(n: int, weights: Real[ArrayLike, " n"] | None = None) -> Float[Array, "n n"]:
    r"""FedAvg as a mixing matrix: every row is `p = w / Σ_j w_j` (uniform `1/N` without weights).

    The trust-weighted reference (`naive`) uses uniform weights; weights such as token counts give
    McMahan et al.'s data-size weighting.
    """
    if weights is None:
        return jnp.full((n, n), 1.0 / n, jnp.float32)
    w = jnp.asarray(weights, jnp.float32)
    return jnp.broadcast_to(w / w.sum(), (n, n))


def fedavg(stacked_tree: PyTree, weights: Real[ArrayLike, " n"] | None = None) -> PyTree:
    r"""Every client receives the (weighted) average `Σ_j p_j θ_j`, `p = w / Σ w` (default 1/N)."""
    return mix(stacked_tree, fedavg_matrix(num_clients(stacked_tree), weights))


def local(stacked_tree: PyTree) -> PyTree:
    """No aggregation (local training only, the reference's `none`): the identity."""
    return stacked_tree


def _init_identity(stacked_tree: PyTree) -> MixState:
    return MixState(jnp.eye(num_clients(stacked_tree), dtype=jnp.float32))


def _matrix_aggregator(matrix_fn: Callable[[PyTree, Inputs], jax.Array]) -> Aggregator:
    """An aggregator that computes `W = matrix_fn(stacked_tree, inputs)` and mixes with it."""

    def apply(
        stacked_tree: PyTree, state: MixState, inputs: Inputs | None = None
    ) -> tuple[PyTree, MixState]:
        del state
        matrix = matrix_fn(stacked_tree, inputs or {})
        return mix(stacked_tree, matrix), MixState(matrix)

    return Aggregator(_init_identity, apply)


def local_aggregator() -> Aggregator:
    """Local training only: `apply` returns the tree unchanged; `MixState.matrix` is identity."""

    def apply(
        stacked_tree: PyTree, state: MixState, inputs: Inputs | None = None
    ) -> tuple[PyTree, MixState]:
        del inputs
        return stacked_tree, state

    return Aggregator(_init_identity, apply)


def fedavg_aggregator(weights: Real[ArrayLike, " n"] | None = None) -> Aggregator:
    """FedAvg (`fedavg`); `inputs["weights"]`, when given, overrides the fixed `weights`."""
    return _matrix_aggregator(
        lambda tree, inputs: fedavg_matrix(num_clients(tree), inputs.get("weights", weights))
    )


TRUST_RULES: dict[str, tuple[Callable[..., jax.Array], str | None]] = {
    "weights": (trust.weight_similarity, None),
    "validation": (trust.validation_trust, "ppl"),
    "prediction": (trust.prediction_trust, "logits"),
    "oracle": (trust.oracle_trust, "mixtures"),
}
"""Trust rule name -> (rule, the `inputs` key it reads; `None`: the stacked tree itself)."""


def trust_aggregator(rule: str, **rule_options: Any) -> Aggregator:
    """Personalized aggregation with a trust matrix recomputed from scratch at every `apply`.

    `rule` names a `TRUST_RULES` entry (`"weights"`, `"validation"`, `"prediction"`, `"oracle"`);
    `rule_options` go to it (temperature, `top_k`, `scale`, and the shared peer selection
    `top_peers`, `threshold`, `min_keep`, `adjacency`; see `fedjax_lora.aggregation.trust`).
    The matrix used is returned in `MixState.matrix`.
    """
    if rule not in TRUST_RULES:
        raise ValueError(f"unknown trust rule {rule!r}; expected one of {sorted(TRUST_RULES)}")
    fn, key = TRUST_RULES[rule]
    inspect.signature(fn).bind(None, **rule_options)  # fail early on unknown options
    rule_fn = functools.partial(fn, **rule_options)
    return _matrix_aggregator(lambda tree, inputs: rule_fn(tree if key is None else inputs[key]))
