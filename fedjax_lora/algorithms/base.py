"""Algorithms as pure `(init, round)` pairs over a `SimState`.

A round is: local training of every client (`lax.scan` over steps, clients mapped by the
problem's strategy), aggregation (a pure function of the stacked client trees), evaluation. The
round is compiled once; the round counter is data, so later rounds never recompile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lora.aggregation import Aggregator, MixState
from fedjax_lora.algorithms.problem import Problem, TrainData
from fedjax_lora.engine.evaluate import evaluate_clients, make_client_eval
from fedjax_lora.engine.state import ClientState, init_clients
from fedjax_lora.engine.train import make_client_update, train_clients

PyTree = Any
Metrics = dict[str, Any]


class SimState(NamedTuple):
    """The whole simulation state: per-client state, the round counter, the aggregator's state."""

    clients: ClientState
    round: jax.Array
    agg_state: PyTree


class Algorithm(NamedTuple):
    """`init(key) -> SimState`; `round(state) -> (state, metrics)` (compiled once);
    `evaluate(state) -> metrics` (the clients' current models, no training)."""

    name: str
    init: Callable[[jax.Array], SimState]
    round: Callable[[SimState], tuple[SimState, Metrics]]
    evaluate: Callable[[SimState], Metrics]


def evaluation(
    problem: Problem,
    params: PyTree,
    eval_sets: dict,
    base: PyTree,
    client_eval: Callable | None = None,
) -> Metrics:
    """Per-client `loss`/`ppl`/`accuracy` on every evaluation set (call inside `jit`).

    client_eval: the per-client evaluation (`make_client_eval`'s contract); default: the problem's
    model with dropout off."""
    client_eval = client_eval or make_client_eval(problem.graphdef, problem.eval_batch_size)
    return {
        name: evaluate_clients(client_eval, problem.strategy, params, es, base)
        for name, es in eval_sets.items()
    }


def federated(
    name: str,
    problem: Problem,
    aggregator: Aggregator,
    *,
    shared_init: bool,
    aggregation_inputs: Callable[[TrainData, ClientState, dict, PyTree], dict] | None = None,
    aggregate_from: int = 1,
    client_eval: Callable | None = None,
    train: TrainData | None = None,
    broadcast_to: int | None = None,
    init_state: Callable[[jax.Array], ClientState] | None = None,
    local_update: Callable[..., tuple[ClientState, Metrics]] | None = None,
) -> Algorithm:
    """The generic round: train locally, aggregate with `aggregator`, evaluate.

    aggregation_inputs: `(data, clients, eval_sets, base) -> inputs`, side information for the
    aggregator computed inside the round from the freshly trained clients (e.g. token counts,
    cross-evaluation perplexities). aggregate_from: the first round (1-based) that ends with an
    aggregation; earlier rounds are local warm-up (`lax.cond`: neither the inputs nor the
    aggregation are computed there). client_eval: the per-client evaluation (see `evaluation`).
    `train` overrides the problem's training data and `broadcast_to` evaluates a single trained
    model for every client (centralized training). `init_state(key) -> ClientState` and
    `local_update(data, clients, eval_sets, base, round) -> (clients, metrics)` replace the default
    client initialisation and local training (methods with their own local schedule, e.g. the
    bi-level expert/router alternation of CoMiGS).

    Metrics: `train`, one entry per evaluation set, and `aggregation`: `applied` (bool) and, for
    matrix aggregators, the `matrix` in use after this round (trust heatmaps).
    """
    if aggregate_from < 1:
        raise ValueError(f"aggregate_from must be >= 1, got {aggregate_from}")
    train = train or problem.train
    tx = problem.tx()
    if local_update is None:
        update = make_client_update(
            problem.graphdef,
            tx,
            problem.training,
            max_windows=train.max_windows(problem.training.seq_len),
        )

    def eval_params(params, eval_sets, base):
        if broadcast_to is not None:
            params = jax.tree.map(
                lambda x: jnp.broadcast_to(x, (broadcast_to, *x.shape[1:])), params
            )
        return evaluation(problem, params, eval_sets, base, client_eval)

    def init(key: jax.Array) -> SimState:
        if init_state is not None:
            clients = init_state(key)
        else:
            clients = init_clients(
                problem.template, tx, train.num_clients, key, shared_init=shared_init
            )
        clients = problem.strategy.place(clients)
        return SimState(clients, jnp.zeros((), jnp.int32), aggregator.init(clients.params))

    @jax.jit
    def _round(sim: SimState, data: TrainData, eval_sets, base):
        if local_update is not None:
            clients, train_metrics = local_update(data, sim.clients, eval_sets, base, sim.round)
        else:
            clients, train_metrics = train_clients(
                update, problem.strategy, sim.clients, data.tokens, data.lengths, data.mask, base
            )

        def aggregate(_):
            inputs = {}
            if aggregation_inputs is not None:
                inputs = aggregation_inputs(data, clients, eval_sets, base)
            return aggregator.apply(clients.params, sim.agg_state, inputs)

        applied = sim.round + 1 >= aggregate_from
        if aggregate_from == 1:
            params, agg_state = aggregate(None)
        else:
            keep = lambda _: (clients.params, sim.agg_state)
            params, agg_state = jax.lax.cond(applied, aggregate, keep, None)
        clients = clients._replace(params=params)
        agg_metrics = {"applied": applied}
        if isinstance(agg_state, MixState):
            agg_metrics["matrix"] = agg_state.matrix
        metrics = {
            "train": train_metrics,
            "aggregation": agg_metrics,
            **eval_params(params, eval_sets, base),
        }
        return SimState(clients, sim.round + 1, agg_state), metrics

    _evaluate = jax.jit(
        lambda sim, eval_sets, base: eval_params(sim.clients.params, eval_sets, base)
    )

    def round_fn(sim: SimState) -> tuple[SimState, Metrics]:
        return _round(sim, train, problem.eval_sets, problem.base)

    def evaluate(sim: SimState) -> Metrics:
        return _evaluate(sim, problem.eval_sets, problem.base)

    return Algorithm(name, init, round_fn, evaluate)
