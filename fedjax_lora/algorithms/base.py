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

from fedjax_lora.aggregation import Aggregator
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


def evaluation(problem: Problem, params: PyTree, eval_sets: dict, base: PyTree) -> Metrics:
    """Per-client `loss`/`ppl`/`accuracy` on every evaluation set (call inside `jit`)."""
    client_eval = make_client_eval(problem.graphdef, problem.eval_batch_size)
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
    aggregation_inputs: Callable[[TrainData, ClientState], dict] | None = None,
    train: TrainData | None = None,
    broadcast_to: int | None = None,
) -> Algorithm:
    """The generic round: train locally, aggregate with `aggregator`, evaluate.

    aggregation_inputs: side information for the aggregator computed inside the round (e.g. token
    counts, cross-evaluation perplexities). `train` overrides the problem's training data and
    `broadcast_to` evaluates a single trained model for every client (centralized training).
    """
    train = train or problem.train
    tx = problem.tx()
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
        return evaluation(problem, params, eval_sets, base)

    def init(key: jax.Array) -> SimState:
        clients = init_clients(
            problem.template, tx, train.num_clients, key, shared_init=shared_init
        )
        clients = problem.strategy.place(clients)
        return SimState(clients, jnp.zeros((), jnp.int32), aggregator.init(clients.params))

    @jax.jit
    def _round(sim: SimState, data: TrainData, eval_sets, base):
        clients, train_metrics = train_clients(
            update, problem.strategy, sim.clients, data.tokens, data.lengths, data.mask, base
        )
        inputs = {} if aggregation_inputs is None else aggregation_inputs(data, clients)
        params, agg_state = aggregator.apply(clients.params, sim.agg_state, inputs)
        clients = clients._replace(params=params)
        metrics = {"train": train_metrics, **eval_params(params, eval_sets, base)}
        return SimState(clients, sim.round + 1, agg_state), metrics

    _evaluate = jax.jit(
        lambda sim, eval_sets, base: eval_params(sim.clients.params, eval_sets, base)
    )

    def round_fn(sim: SimState) -> tuple[SimState, Metrics]:
        return _round(sim, train, problem.eval_sets, problem.base)

    def evaluate(sim: SimState) -> Metrics:
        return _evaluate(sim, problem.eval_sets, problem.base)

    return Algorithm(name, init, round_fn, evaluate)
