r"""Server optimizers: any optax transformation applied to the federated pseudo-gradient.

Adaptive federated optimization (Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
Algorithm 2) treats the round's aggregate as a step: with :math:`θ` the global tree the clients
received and :math:`\bar θ` the inner aggregator's consensus (FedAvg's mean, a robust
reduction, a DP mean),

.. math:: Δ = \bar θ − θ, \qquad θ ← θ + \mathrm{tx}(−Δ)

(optax convention: `tx` maps a gradient to an update, so `−Δ` is the pseudo-gradient). The global
tree and `tx`'s state live in the aggregator state, so they are checkpointed with the simulation
state. Only the global part (a mask policy of `aggregation.masks`) is optimized; local leaves
keep the inner aggregator's result (their pseudo-gradient is zero and the server's value is not
used).

A method with a global part takes the server optimizer as its option `server_opt`
(`ServerOptimizer`: `kind`, `lr`, `momentum`, `b1`, `b2`, `eps`; `with_server_optimizer`); the
named methods `fedavgm`, `fedadam`, `fedyogi`, `fedadagrad` are FedAvg with it set.

The named server optimizers are optax's own transformations (as OpenFedLLM and Flower name them):

- `fedavgm`: `optax.sgd(lr, momentum)` (Hsu et al. 2019). With `lr = 1`, `momentum = 0` it *is*
  FedAvg: :math:`θ ← θ + Δ = \bar θ`.
- `fedadam`: `optax.adam(lr, b1, b2, eps)`; `fedyogi`: `optax.yogi(lr, b1, b2, eps)`;
  `fedadagrad`: `optax.adagrad(lr, initial_accumulator_value=eps², eps=0)` (Reddi's
  :math:`v_{−1} = τ^2`). Defaults :math:`β_1 = 0.9`, :math:`β_2 = 0.99`, :math:`τ = 10^{−3}`
  (Reddi et al.'s experiments); the server learning rate is tuned per task in the paper (its
  grid), the defaults here are its typical values. Differences from Algorithm 2: optax's Adam
  and Yogi bias-correct the moments (the paper does not), Yogi starts its moments at optax's
  `1e-6`, and Adagrad divides by :math:`\sqrt{v}` with :math:`v_{−1} = τ^2` instead of by
  :math:`\sqrt{v} + τ`.

No Adam setting reduces to FedAvg: Adam divides by the second moment, so its first step is
:math:`θ + η\,Δ / (|Δ| + τ)`, a sign-like step of size about `η` per coordinate whatever the size
of `Δ`; only `fedavgm(lr=1, momentum=0)` (or any `tx` that is the identity on `−Δ` up to sign,
`optax.sgd(1.0)`) equals FedAvg exactly.

The inner aggregator must be a consensus rule on the global part (all rows equal, e.g. `masked`,
a robust reduction, `dp_aggregator`); its row mean is taken as :math:`\bar θ`. The named
factories default to `masked_aggregator(policy)`, FedAvg of the global part (token-weighted when
`inputs["weights"]` is given). The
global tree is passed to the inner rule as `inputs["global"]` (no client axis), so that a DP
inner rule clips the client updates relative to it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lora.aggregation.core import Aggregator, Inputs
from fedjax_lora.aggregation.masks import PolicyArg, global_mask, masked_aggregator, merge_global
from fedjax_lora.engine.optim import standard_promotion
from fedjax_lora.settings import ServerOptimizer

__all__ = [
    "DEFAULT_LR",
    "ServerOptState",
    "ServerOptimizer",
    "fedadagrad",
    "fedadam",
    "fedavgm",
    "fedyogi",
    "server_optimizer",
    "server_tx",
    "with_server_optimizer",
]

PyTree = Any


class ServerOptState(NamedTuple):
    """global_tree: the global model `θ` (f32, no client axis; its local part is unused);
    opt_state: `tx`'s state over it; inner: the inner aggregator's state."""

    global_tree: PyTree
    opt_state: optax.OptState
    inner: PyTree


def client_mean(stacked_tree: PyTree) -> PyTree:
    """The f32 mean over the client axis of every leaf (no client axis)."""
    return jax.tree.map(lambda x: jnp.mean(x.astype(jnp.float32), axis=0), stacked_tree)


def unstacked_mask(stacked_tree: PyTree, global_tree: PyTree, policy: PolicyArg) -> PyTree:
    """The policy's global mask of `stacked_tree`, broadcastable to the unstacked `global_tree`
    (a per-slot mask `[1, E, 1, ...]` loses its client axis)."""
    return jax.tree.map(
        lambda m, g: m[0] if m.ndim else m, global_mask(stacked_tree, policy), global_tree
    )


def server_optimizer(
    inner: Aggregator,
    tx: optax.GradientTransformation,
    policy: PolicyArg = "all",
) -> Aggregator:
    """`inner`'s consensus taken as a step of `tx` from the global tree (module docstring)."""
    global_mask(None, policy)  # fail early on an unknown policy
    tx = standard_promotion(tx)  # optax mixes Python floats with its int32 step counter

    def init(stacked_tree: PyTree) -> ServerOptState:
        global_tree = client_mean(stacked_tree)
        return ServerOptState(global_tree, tx.init(global_tree), inner.init(stacked_tree))

    def apply(
        stacked_tree: PyTree, state: ServerOptState, inputs: Inputs | None = None
    ) -> tuple[PyTree, ServerOptState]:
        theta = state.global_tree
        aggregated, inner_state = inner.apply(
            stacked_tree, state.inner, {**(inputs or {}), "global": theta}
        )
        mask = unstacked_mask(stacked_tree, theta, policy)
        pseudo_grad = jax.tree.map(
            lambda m, t, a: jnp.where(m, t - a, 0.0), mask, theta, client_mean(aggregated)
        )
        updates, opt_state = tx.update(pseudo_grad, state.opt_state, theta)
        theta = optax.apply_updates(theta, updates)
        broadcast = jax.tree.map(
            lambda t, x: jnp.broadcast_to(t, x.shape).astype(x.dtype), theta, stacked_tree
        )
        new_tree = merge_global(aggregated, broadcast, policy)
        return new_tree, ServerOptState(theta, opt_state, inner_state)

    return Aggregator(init, apply)


DEFAULT_LR = {"sgd": 1.0, "adam": 1e-2, "yogi": 1e-2, "adagrad": 1e-1}
"""The server learning rate of each `ServerOptimizer.kind` when `lr` is None."""


def server_tx(options: ServerOptimizer) -> optax.GradientTransformation:
    """The optax transformation of `options` (not `kind="none"`): `sgd(lr, momentum)`,
    `adam`/`yogi(lr, b1, b2, eps)`, `adagrad(lr, initial_accumulator_value=eps², eps=0)`."""
    lr = DEFAULT_LR[options.kind] if options.lr is None else options.lr
    b1, b2, eps = options.b1, options.b2, options.eps
    if options.kind == "sgd":
        return optax.sgd(lr, options.momentum or None)
    if options.kind == "adam":
        return optax.adam(lr, b1, b2, eps)
    if options.kind == "yogi":
        return optax.yogi(lr, b1, b2, eps)
    return optax.adagrad(lr, initial_accumulator_value=eps**2, eps=0.0)


def with_server_optimizer(
    inner: Aggregator, options: ServerOptimizer, policy: PolicyArg = "all"
) -> Aggregator:
    """`inner` as is for `options.kind == "none"`, else `server_optimizer(inner, server_tx(options),
    policy)`: the `server_opt` option of every method with a global part (`policy` names it)."""
    if options.kind == "none":
        return inner
    return server_optimizer(inner, server_tx(options), policy)


def _fedopt(options: ServerOptimizer, inner: Aggregator | None, policy: PolicyArg):
    """The server optimizer of `options` over `inner`, by default FedAvg of the `policy`'s global
    part."""
    return server_optimizer(inner or masked_aggregator(policy), server_tx(options), policy)


def fedavgm(
    lr: float = 1.0,
    momentum: float = 0.9,
    inner: Aggregator | None = None,
    policy: PolicyArg = "all",
) -> Aggregator:
    """FedAvgM: server SGD with momentum on the pseudo-gradient (`optax.sgd(lr, momentum)`).
    `inner` defaults to FedAvg of the `policy`'s global part (`masked_aggregator(policy)`)."""
    return _fedopt(ServerOptimizer("sgd", lr, momentum), inner, policy)


def fedadam(
    lr: float = 1e-2,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
    inner: Aggregator | None = None,
    policy: PolicyArg = "all",
) -> Aggregator:
    """FedAdam (Reddi et al. 2021): `optax.adam(lr, b1, b2, eps)` on the pseudo-gradient."""
    return _fedopt(ServerOptimizer("adam", lr, b1=b1, b2=b2, eps=eps), inner, policy)


def fedyogi(
    lr: float = 1e-2,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-3,
    inner: Aggregator | None = None,
    policy: PolicyArg = "all",
) -> Aggregator:
    """FedYogi (Reddi et al. 2021): `optax.yogi(lr, b1, b2, eps)` on the pseudo-gradient."""
    return _fedopt(ServerOptimizer("yogi", lr, b1=b1, b2=b2, eps=eps), inner, policy)


def fedadagrad(
    lr: float = 1e-1,
    eps: float = 1e-3,
    inner: Aggregator | None = None,
    policy: PolicyArg = "all",
) -> Aggregator:
    """FedAdagrad (Reddi et al. 2021): `optax.adagrad` with `v_{-1} = eps²` on the
    pseudo-gradient."""
    return _fedopt(ServerOptimizer("adagrad", lr, eps=eps), inner, policy)
