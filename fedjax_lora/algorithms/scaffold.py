r"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1 with option II) over the adapters.

The server holds the global adapters :math:`x` and a control variate :math:`c`; client :math:`i`
holds its own :math:`c_i` (`ClientState.aux["control"]`, zeros at the start, as :math:`c`). In a
round every drawn client :math:`i ∈ S` starts from :math:`y_i = x` and takes :math:`K` local steps
on the corrected gradient

.. math:: y_i ← y_i − η_l\,\big(g_i(y_i) − c_i + c\big)

(`base.drift_corrected` with the update correction :math:`η_l (c_i − c)`: the paper's step
with `optimizer.name=sgd`; with Adam or AdamW the correction is added to the optimizer's update,
in the units of :math:`c_i`, update per unit of :math:`η_l`), then updates its control variate
(option II)

.. math:: c_i^+ = c_i − c + \frac{x − y_i}{K η_l}, \qquad Δc_i = c_i^+ − c_i

and uploads :math:`Δy_i = y_i − x` and :math:`Δc_i` (`aux["control_delta"]`). The server
applies

.. math:: x ← x + η_g \frac{1}{|S|} \sum_{i∈S} Δy_i, \qquad
          c ← c + \frac{|S|}{N} \frac{1}{|S|} \sum_{i∈S} Δc_i,

with :math:`N` the population (`|S| = N` without a cohort). :math:`η_g = 1` (the default, plain
averaging) is the paper's; `server_opt` replaces the averaging step by any server optimizer
(`aggregation.server_opt`; `kind="sgd", momentum=0, lr=η_g` is the paper's :math:`η_g`).
:math:`K` is `training.steps` and :math:`η_l` the clients' learning rate (`local_lr`, default the
problem's `optimizer.lr`); since :math:`η_l` is fixed here, a vectorized learning-rate sweep is
refused. The server's state (`ScaffoldState`: the aggregator's state and :math:`c`) reaches the
clients as `RoundInputs.server`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lora.aggregation import Aggregator, Exchange, fedavg_aggregator
from fedjax_lora.aggregation.masks import PolicyArg, merge_global
from fedjax_lora.aggregation.server_opt import client_mean
from fedjax_lora.algorithms.base import (
    Algorithm,
    Capabilities,
    ClientProgram,
    Evaluate,
    Method,
    RoundInputs,
    ServerProgram,
    aggregating,
    anchored,
    build,
    exchanged,
    proximal,
    standard_client,
)
from fedjax_lora.algorithms.problem import Problem
from fedjax_lora.algorithms.registry import register
from fedjax_lora.engine.optim import OptimizerConfig
from fedjax_lora.engine.state import ClientState
from fedjax_lora.settings import ServerOptimizer
from fedjax_lora.typing import PyTree

__all__ = [
    "CONTROL",
    "CONTROL_DELTA",
    "ScaffoldOptions",
    "ScaffoldState",
    "control_delta",
    "controlled",
    "federated_scaffold",
    "local_learning_rate",
    "scaffold",
    "scaffold_client",
    "scaffold_server",
]

CONTROL, CONTROL_DELTA = "control", "control_delta"
"""The `ClientState.aux` keys of a client's control variate `c_i` and its last upload `Δc_i`."""


class ScaffoldState(NamedTuple):
    """The server's state: `inner`, its aggregator's (a `ServerOptState` with `server_opt`), and
    `control`, the server control variate `c` (f32, no client axis)."""

    inner: PyTree
    control: PyTree


def control_delta(x: PyTree, y: PyTree, c: PyTree, steps: int, lr: float) -> PyTree:
    """Option II's `Δc_i = c_i⁺ − c_i = (x − y_i) / (K η_l) − c` per client (`K = steps`,
    `η_l = lr`; `x`, `y` stacked `[N, ...]`, `c` unstacked), in the dtype of `y`."""
    return jax.tree.map(lambda a, b, s: ((a - b) / (steps * lr) - s).astype(b.dtype), x, y, c)


def scaffold_client(
    client: ClientProgram, steps: int, lr: float, policy: PolicyArg = "all"
) -> ClientProgram:
    """`client` (optimizer `drift_corrected`, `steps` local steps of learning rate `lr`) with
    SCAFFOLD's client side: `c_i = 0` at init (`aux`), every round's updates corrected by
    `η_l (c_i − c)` (`c` from `RoundInputs.server`, a `ScaffoldState`) and then
    `c_i ← c_i + Δc_i` (`control_delta`), `Δc_i` kept as the upload. Only `policy`'s global part
    (`aggregation.masks`) has control variates: elsewhere `Δc_i = 0`, so `c_i = c = 0` and the
    local tensors train uncorrected."""

    def init(key: jax.Array) -> ClientState:
        clients = client.init(key)
        zeros = jax.tree.map(jnp.zeros_like, clients.params)
        return clients._replace(aux={**clients.aux, CONTROL: zeros, CONTROL_DELTA: zeros})

    def correction(clients: ClientState, inputs: RoundInputs) -> PyTree:
        return jax.tree.map(
            lambda c, ci: (lr * (ci - c)).astype(ci.dtype),
            inputs.server.control,
            clients.aux[CONTROL],
        )

    corrected = anchored(client, correction)

    def update(clients: ClientState, inputs: RoundInputs):
        trained, metrics = corrected.update(clients, inputs)
        c = inputs.server.control
        delta = control_delta(clients.params, trained.params, c, steps, lr)
        delta = merge_global(jax.tree.map(jnp.zeros_like, delta), delta, policy)
        control = jax.tree.map(jnp.add, clients.aux[CONTROL], delta)
        aux = {**trained.aux, CONTROL: control, CONTROL_DELTA: delta}
        return trained._replace(aux=aux), metrics

    return ClientProgram(init, update)


SCAFFOLD_RULE = (
    "SCAFFOLD's server also averages the clients' control-variate updates dc_i, which neither a "
    "robust reduction nor DP clipping and noise would cover"
)


def controlled(server: ServerProgram, population: int) -> ServerProgram:
    """SCAFFOLD's server around `server` (its state in `ScaffoldState.inner`): after `server`'s
    aggregation, `c ← c + (|S|/N) mean_S Δc_i`, `N = population`, `|S|` the clients it is given
    (the cohort); each client uploads and downloads twice `server`'s bytes (the tensors and
    their control variates). No `GlobalRule` replaces its aggregation (`own_rule`)."""

    def init(key: jax.Array, clients: ClientState) -> ScaffoldState:
        control = jax.tree.map(jnp.zeros_like, client_mean(clients.params))
        return ScaffoldState(server.init(key, clients), control)

    def apply(clients: ClientState, state: ScaffoldState, inputs: RoundInputs):
        aggregated, inner, metrics, host_inputs = server.apply(clients, state.inner, inputs)
        fraction = jax.tree.leaves(clients.params)[0].shape[0] / population  # |S| / N
        control = jax.tree.map(
            lambda c, d: c + fraction * client_mean(d), state.control, clients.aux[CONTROL_DELTA]
        )
        return aggregated, ScaffoldState(inner, control), metrics, host_inputs

    def comm(clients: ClientState) -> Exchange:
        one = server.comm(clients)
        return Exchange(2 * one.upload, 2 * one.download)

    return ServerProgram(
        init,
        apply,
        server.host,
        server.server_model,
        comm,
        global_part=None,
        own_rule=SCAFFOLD_RULE,
    )


def scaffold_server(aggregator: Aggregator, population: int) -> ServerProgram:
    """SCAFFOLD's server (a server model): `aggregator` over the adapters, `controlled`."""
    return controlled(aggregating(aggregator, server_model=True, comm=exchanged("all")), population)


def local_learning_rate(problem: Problem, local_lr: float | None, name: str) -> float:
    """`η_l` of SCAFFOLD's control update: `local_lr`, or the problem's `optimizer.lr`; refused
    (one line naming `method_options.<name>.local_lr`) when neither is known or it is not
    positive."""
    if local_lr is None:
        if not isinstance(problem.optimizer, OptimizerConfig):
            raise ValueError(
                f"{name} with SCAFFOLD needs the local learning rate η_l of its control update "
                "and the clients' optimizer is an optax transformation (your own, or a sweep's: "
                "SCAFFOLD cannot be vectorized over learning rates); set "
                f"method_options.{name}.local_lr"
            )
        local_lr = problem.optimizer.lr
    if not local_lr > 0:
        raise ValueError(f"method_options.{name}.local_lr must be positive, got {local_lr}")
    return local_lr


def federated_scaffold(
    name: str,
    problem: Problem,
    aggregator: Aggregator,
    *,
    policy: PolicyArg,
    server_opt: ServerOptimizer = ServerOptimizer(),
    proximal_mu: float | None = None,
    evaluate: Evaluate = "aggregated",
    server_model: bool = False,
    local_lr: float | None = None,
) -> Algorithm:
    """The method of `aggregator` (the mean of `policy`'s global part, stepped by `server_opt`)
    with SCAFFOLD's control variates over that part (`scaffold_client`, `controlled`): the named
    `scaffold`, and the `scaffold` option of FedAvg, FFA-LoRA and FedSA-LoRA. proximal_mu:
    FedProx's term as well (None: none); local_lr: `η_l` (`local_learning_rate`)."""
    lr = local_learning_rate(problem, local_lr, name)
    population, steps = problem.num_clients, problem.training.steps
    problem = proximal(problem, proximal_mu or 0.0)  # the drift-corrected optimizer
    client = scaffold_client(standard_client(problem, shared_init=True), steps, lr, policy)
    server = aggregating(
        aggregator, server_model=server_model, policy=policy, server_opt=server_opt
    )
    method = Method(
        name,
        client,
        controlled(server, population),
        evaluate=evaluate,
        capabilities=Capabilities(sweeps=False),
    )
    return build(problem, method)


@dataclasses.dataclass(frozen=True)
class ScaffoldOptions:
    """server_opt: the server step (default plain averaging, `η_g = 1`); local_lr: `η_l` of the
    control update (default the problem's `optimizer.lr`); evaluate: which adapters are
    evaluated (`base.Method`)."""

    server_opt: ServerOptimizer = ServerOptimizer()
    local_lr: float | None = None
    evaluate: Evaluate = "aggregated"


def scaffold(problem: Problem, options: ScaffoldOptions = ScaffoldOptions()) -> Algorithm:
    """SCAFFOLD (Karimireddy et al., ICML 2020, option II): FedAvg with server and per-client
    control variates correcting the local steps (module docstring, `ScaffoldOptions`)."""
    return federated_scaffold(
        "scaffold",
        problem,
        fedavg_aggregator(),
        policy="all",
        server_opt=options.server_opt,
        evaluate=options.evaluate,
        server_model=True,
        local_lr=options.local_lr,
    )


register("scaffold", scaffold, ScaffoldOptions())
