"""Algorithms as pure `(init, round)` pairs over a `SimState`.

A round is: local training of every client (`lax.scan` over steps, clients mapped by the
problem's strategy), aggregation (a pure function of the stacked client trees), evaluation. The
round is compiled once; the round counter is data, so later rounds never recompile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lora.aggregation import Aggregator, MixState
from fedjax_lora.algorithms.problem import Problem, TrainData
from fedjax_lora.engine import cohort as cohorts
from fedjax_lora.engine.evaluate import EvalSet, evaluate_clients, make_client_eval
from fedjax_lora.engine.instruction import make_client_task
from fedjax_lora.engine.state import ClientState, init_clients
from fedjax_lora.engine.strategy import map_clients
from fedjax_lora.engine.train import make_client_update, train_clients
from fedjax_lora.tracking import ticking
from fedjax_lora.typing import PyTree

Metrics = dict[str, Any]

Evaluate = Literal["local", "aggregated"]
"""Which models a round evaluates: `"local"`, each client's locally trained model before the
server average (the CoMiGS reference evaluates inside `GeneralClient.train`, for every method of
that paper), or `"aggregated"`, the models after aggregation."""


def evaluates_local(evaluate: Evaluate) -> bool:
    """`federated`'s `evaluate_local` for a method's `evaluate` option (checked)."""
    if evaluate not in ("local", "aggregated"):
        raise ValueError(f"evaluate must be 'local' or 'aggregated', got {evaluate!r}")
    return evaluate == "local"


class SimState(NamedTuple):
    """The whole simulation state: per-client state, the round counter, the aggregator's state,
    and the simulation's own PRNG key (cohort sampling draws from `fold_in(key, round)`; None
    when no cohort is sampled)."""

    clients: ClientState
    round: jax.Array
    agg_state: PyTree
    key: jax.Array | None = None


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
    wrap: Callable[[Callable], Callable] | None = None,
) -> Metrics:
    """Per-client `loss`/`ppl`/`accuracy` on every window set, and the text task of
    `problem.task` on a `GenerationSet`/`ChoiceSet` (`fedjax_lora.engine.instruction`: generated
    tokens, scored on the host, or choice `accuracy`) (call inside `jit`).

    client_eval: the per-client window evaluation (`make_client_eval`'s contract); default: the
    problem's model with dropout off. wrap: applied to every per-client function
    `fn(params, ..., base)` (e.g. FedAMoLE's merge of the client's expert masks into the base).
    With `problem.eval_progress` every client's evaluation on every set ticks the host's
    `evaluation_progress` bar."""
    client_eval = client_eval or make_client_eval(problem.graphdef, problem.eval_batch_size)
    wrap = wrap or (lambda fn: fn)
    if problem.eval_progress:
        wrap = lambda fn, inner=wrap: ticking(inner(fn))
    out = {}
    for name, es in eval_sets.items():
        if isinstance(es, EvalSet):
            out[name] = evaluate_clients(wrap(client_eval), problem.strategy, params, es, base)
            continue
        if problem.task is None:
            raise ValueError(f"evaluation set {name!r} is a text task but problem.task is None")
        fn = make_client_task(problem.graphdef, problem.eval_batch_size, es, problem.task)
        out[name] = map_clients(wrap(fn), problem.strategy, (params, *es), (base,))
    return out


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
    evaluate_local: bool = False,
    server_model: bool = False,
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
    bi-level expert/router alternation of CoMiGS). evaluate_local: evaluate every client's locally
    trained adapters, before aggregation (the "-FT" baselines of FedAMoLE: the global model after
    local fine-tuning), instead of the aggregated ones. server_model: the aggregate is one model
    for everyone (FedAvg); with a cohort (`problem.cohort`, `fedjax_lora.engine.cohort`) the idle
    clients receive it too, otherwise only the cohort's rows change. With a cohort, training and
    aggregation see the `K` drawn clients (their data and evaluation windows gathered), the
    aggregator's state is shaped for `K`, evaluation covers the whole population, and
    `metrics["train"]["cohort"]` holds the drawn indices.

    Metrics: `train`, one entry per evaluation set, and `aggregation`: `applied` (bool) and, for
    matrix aggregators, the `matrix` in use after this round (trust heatmaps).
    """
    if aggregate_from < 1:
        raise ValueError(f"aggregate_from must be >= 1, got {aggregate_from}")
    cohort = problem.cohort if train is None else None  # centralized: one pooled client
    if cohort is not None and local_update is not None:
        raise ValueError(
            f"method {name!r} has its own local update and does not support client cohorts; "
            "unset data.cohort_size"
        )
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
        if cohort is None:
            return SimState(clients, jnp.zeros((), jnp.int32), aggregator.init(clients.params))
        first = cohorts.take(clients.params, jnp.arange(cohort.size))
        sim_key = jax.random.fold_in(key, cohorts.KEY_STREAM)
        return SimState(clients, jnp.zeros((), jnp.int32), aggregator.init(first), sim_key)

    @jax.jit
    def _round(sim: SimState, data: TrainData, eval_sets, base):
        population, population_eval = sim.clients, eval_sets
        if cohort is not None:
            idx = cohort.sample(jax.random.fold_in(sim.key, sim.round), data.token_counts())
            drawn, data, eval_sets = cohorts.take((sim.clients, data, eval_sets), idx)
            sim = sim._replace(clients=cohort.prepare(drawn, tx))
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
        agg_metrics = {"applied": applied}
        if isinstance(agg_state, MixState):
            agg_metrics["matrix"] = agg_state.matrix
        local_params, clients = clients.params, clients._replace(params=params)
        if cohort is not None:
            train_metrics = {**train_metrics, "cohort": idx}
            local_params = cohorts.put(population.params, idx, local_params)
            clients = cohorts.merge(population, idx, clients, server_model and applied)
        metrics = {
            "train": train_metrics,
            "aggregation": agg_metrics,
            **eval_params(
                local_params if evaluate_local else clients.params, population_eval, base
            ),
        }
        return sim._replace(clients=clients, round=sim.round + 1, agg_state=agg_state), metrics

    _evaluate = jax.jit(
        lambda sim, eval_sets, base: eval_params(sim.clients.params, eval_sets, base)
    )

    def round_fn(sim: SimState) -> tuple[SimState, Metrics]:
        return _round(sim, train, problem.eval_sets, problem.base)

    def evaluate(sim: SimState) -> Metrics:
        return _evaluate(sim, problem.eval_sets, problem.base)

    return Algorithm(name, init, round_fn, evaluate)
