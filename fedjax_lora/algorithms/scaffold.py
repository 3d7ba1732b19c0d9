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

from fedjax_lora.aggregation import Aggregator, Exchange, fedavg_aggregator, with_server_optimizer
from fedjax_lora.aggregation.server_opt import client_mean
from fedjax_lora.algorithms.base import (
    Algorithm,
    Capabilities,
    ClientProgram,
    Evaluate,
    Method,
    RoundInputs,
    ServerProgram,
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


def scaffold_client(client: ClientProgram, steps: int, lr: float) -> ClientProgram:
    """`client` (optimizer `drift_corrected`, `steps` local steps of learning rate `lr`) with
    SCAFFOLD's client side: `c_i = 0` at init (`aux`), every round's updates corrected by
    `η_l (c_i − c)` (`c` from `RoundInputs.server`, a `ScaffoldState`) and then
    `c_i ← c_i + Δc_i` (`control_delta`), `Δc_i` kept as the upload."""

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
        control = jax.tree.map(jnp.add, clients.aux[CONTROL], delta)
        aux = {**trained.aux, CONTROL: control, CONTROL_DELTA: delta}
        return trained._replace(aux=aux), metrics

    return ClientProgram(init, update)


def scaffold_server(aggregator: Aggregator, population: int) -> ServerProgram:
    """SCAFFOLD's server (a server model): `aggregator` over the adapters (its state in
    `ScaffoldState.inner`) and `c ← c + (|S|/N) mean_S Δc_i`, `N = population`, `|S|` the
    clients it is given (the cohort)."""

    def init(key: jax.Array, clients: ClientState) -> ScaffoldState:
        control = jax.tree.map(jnp.zeros_like, client_mean(clients.params))
        return ScaffoldState(aggregator.init(clients.params), control)

    def apply(clients: ClientState, state: ScaffoldState, inputs: RoundInputs):
        params, inner = aggregator.apply(clients.params, state.inner, {})
        fraction = jax.tree.leaves(params)[0].shape[0] / population  # |S| / N
        control = jax.tree.map(
            lambda c, d: c + fraction * client_mean(d), state.control, clients.aux[CONTROL_DELTA]
        )
        metrics = {"applied": jnp.asarray(True)}
        return clients._replace(params=params), ScaffoldState(inner, control), metrics, None

    return ServerProgram(init, apply, None, server_model=True, comm=scaffold_comm)


def scaffold_comm(clients: ClientState) -> Exchange:
    """Every client uploads its adapters and its control-variate update `Δc_i` (one adapter tree
    each) and downloads the server's adapters and control variate `c`: twice FedAvg's bytes."""
    one = exchanged("all")(clients)
    return Exchange(2 * one.upload, 2 * one.download)


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
    server_opt, local_lr, evaluate = options.server_opt, options.local_lr, options.evaluate
    if local_lr is None:
        if not isinstance(problem.optimizer, OptimizerConfig):
            raise ValueError(
                "scaffold needs the local learning rate η_l of its control update and the "
                "clients' optimizer is an optax transformation (your own, or a sweep's: scaffold "
                "cannot be vectorized over learning rates); set method_options.scaffold.local_lr"
            )
        local_lr = problem.optimizer.lr
    if not local_lr > 0:
        raise ValueError(f"method_options.scaffold.local_lr must be positive, got {local_lr}")
    population, steps = problem.num_clients, problem.training.steps
    problem = proximal(problem, 0.0)  # the drift-corrected optimizer, no proximal term
    client = scaffold_client(standard_client(problem, shared_init=True), steps, local_lr)
    aggregator = with_server_optimizer(fedavg_aggregator(), server_opt)
    method = Method(
        "scaffold",
        client,
        scaffold_server(aggregator, population),
        evaluate=evaluate,
        capabilities=Capabilities(sweeps=False),
    )
    return build(problem, method)


register("scaffold", scaffold, ScaffoldOptions())
