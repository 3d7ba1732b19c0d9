"""The one federated round, and a method as a value plugged into it.

A method (`Method`) is data: a client program (`ClientProgram`: initial per-client state, local
update), a server program (`ServerProgram`: initial server state, a pure `apply` inside the round
that returns the clients after aggregation, the server state, metrics and host inputs, and an
optional `host` step outside `jit`, e.g. FedAMoLE's assignment LP), which adapters are
evaluated (`evaluate`: the locally trained ones before aggregation, the aggregated ones, or a
function of both), and declared capabilities (`Capabilities`: client cohorts, vectorized
sweeps). `build(problem, method)` turns it into an `Algorithm`: `init`, the compiled `round`,
`evaluate`. Every method of the library is built by it; none writes its own round.

The round (compiled once; the round counter is data, so later rounds never recompile):

    [cohort] draw K clients, gather their state, data and evaluation windows
    clients, train = client.update(clients, RoundInputs(data, eval_sets, base, round))
    clients', server, agg, host_in = server.apply(clients, server, inputs)   # aggregation
    [cohort] scatter the rows back (the server model to everyone when server.server_model)
    metrics = {"train": train, "aggregation": agg, <set>: evaluate(clients, clients')}
    (host) sim = server.host(sim, host_in)                                   # outside jit

Per-client frozen state (`ClientState.frozen`: the `ClientFrozen` variables of the problem's
model, e.g. CoMiGS's and FedAMoLE's expert masks, HetLoRA's rank scales; every client starts from
the problem's `frozen` template unless its method sets them) is merged over the shared base for
that client in training and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_lora.aggregation import Aggregator, MixState
from fedjax_lora.algorithms.problem import Problem, TrainData
from fedjax_lora.engine import cohort as cohorts
from fedjax_lora.engine.evaluate import EvalSet, evaluate_clients, make_client_eval
from fedjax_lora.engine.instruction import make_client_task
from fedjax_lora.engine.state import ClientState, init_clients
from fedjax_lora.engine.strategy import map_clients
from fedjax_lora.engine.train import make_client_update, train_clients
from fedjax_lora.models.layers import ClientFrozen
from fedjax_lora.tracking import ticking
from fedjax_lora.typing import PyTree

Metrics = dict[str, Any]

Evaluate = Literal["local", "aggregated"]
"""A method option naming which models a round evaluates: `"local"`, each client's locally
trained model before the server average (the CoMiGS reference evaluates inside
`GeneralClient.train`, for every method of that paper), or `"aggregated"`, the models after
aggregation (`Method.evaluate`)."""


class SimState(NamedTuple):
    """The whole simulation state: per-client state, the round counter, the server's state, and
    the simulation's own PRNG key (cohort sampling draws from `fold_in(key, round)`; None when no
    cohort is sampled)."""

    clients: ClientState
    round: jax.Array
    agg_state: PyTree
    key: jax.Array | None = None


class RoundInputs(NamedTuple):
    """What a round hands the client and server programs: the (cohort's) training data, its
    evaluation sets, the shared base, and the 0-based index of this round."""

    data: TrainData
    eval_sets: dict
    base: PyTree
    round: jax.Array


class ClientProgram(NamedTuple):
    """`init(key) -> ClientState [N]`; `update(clients, inputs) -> (clients, metrics)`, the local
    work of every client in one round (inside `jit`; `metrics["train_loss"]` is `[N, steps]`)."""

    init: Callable[[jax.Array], ClientState]
    update: Callable[[ClientState, RoundInputs], tuple[ClientState, Metrics]]


class ServerProgram(NamedTuple):
    """`init(key, clients) -> state` from the simulation's key (the one the client program's
    `init` got) and the initial (cohort's) clients; `apply(clients, state,
    inputs) -> (clients, state, metrics, host_inputs)` (pure, inside `jit`): the clients after
    aggregation; `host(sim, host_inputs) -> sim` (optional, on the host after the compiled round,
    e.g. an LP); `server_model`: the aggregate is one model for everyone, so under a cohort the
    idle clients receive it too."""

    init: Callable[[jax.Array, ClientState], PyTree]
    apply: Callable[[ClientState, PyTree, RoundInputs], tuple[ClientState, PyTree, Metrics, PyTree]]
    host: Callable[[SimState, PyTree], SimState] | None = None
    server_model: bool = False


class Capabilities(NamedTuple):
    """What a method supports: `cohorts` (`data.cohort_size`: a sample of clients per round),
    `sweeps` (`fedjax-lora sweep`: simulations stacked on a vmapped axis; needs a pure round,
    without a host step) and `data_axis` (heterogeneity levels as one more vmapped axis: the
    factory uses the problem's data only as arrays, so they can be traced arguments)."""

    cohorts: bool = True
    sweeps: bool = True
    data_axis: bool = True


Evaluated = Evaluate | Callable[[ClientState, ClientState], PyTree]


class Method(NamedTuple):
    """A federated method as a value (module docstring).

    evaluate: which adapters every round's evaluation sees: `"aggregated"` (after the server),
    `"local"` (each client's locally trained adapters, before aggregation: the protocol of the
    CoMiGS and FedAMoLE references), or `fn(trained, aggregated) -> params [N]`.
    client_eval: the per-client window evaluation (`make_client_eval`'s contract; default: the
    problem's model, dropout off). train: the training data if not the problem's (centralized:
    the pooled streams of all clients as one client)."""

    name: str
    client: ClientProgram
    server: ServerProgram
    evaluate: Evaluated = "aggregated"
    capabilities: Capabilities = Capabilities()
    client_eval: Callable | None = None
    train: TrainData | None = None


class Algorithm(NamedTuple):
    """A method built on a problem: `init(key) -> SimState`; `round(state) -> (state, metrics)`
    (compiled once); `evaluate(state) -> metrics` (the clients' current models, no training);
    `method`: the value it was built from (its capabilities)."""

    name: str
    init: Callable[[jax.Array], SimState]
    round: Callable[[SimState], tuple[SimState, Metrics]]
    evaluate: Callable[[SimState], Metrics]
    method: Method | None = None


def with_frozen(fn: Callable) -> Callable:
    """`fn(params, ..., base)` as `fn((params, frozen), ..., base)`, the client's frozen state
    merged over the shared base."""
    return lambda pf, *args: fn(pf[0], *args[:-1], nnx.merge_state(args[-1], pf[1]))


def evaluation(
    problem: Problem,
    params: PyTree,
    eval_sets: dict,
    base: PyTree,
    client_eval: Callable | None = None,
    frozen: PyTree = None,
) -> Metrics:
    """Per-client `loss`/`ppl`/`accuracy` on every window set, and the text task of
    `problem.task` on a `GenerationSet`/`ChoiceSet` (`fedjax_lora.engine.instruction`: generated
    tokens, scored on the host, or choice `accuracy`) (call inside `jit`).

    client_eval: the per-client window evaluation (`make_client_eval`'s contract); default: the
    problem's model with dropout off. frozen: the clients' frozen state `[N, ...]`
    (`ClientState.frozen`), merged over the base per client. With `problem.eval_progress` every
    client's evaluation on every set ticks the host's `evaluation_progress` bar."""
    client_eval = client_eval or make_client_eval(problem.graphdef, problem.eval_batch_size)
    wrap = lambda fn: fn
    if frozen is not None and jax.tree.leaves(frozen):
        params, wrap = (params, frozen), with_frozen
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


# ---------------------------------------------------------------------------------------------
# Client programs


def standard_client(
    problem: Problem,
    *,
    shared_init: bool,
    tx: optax.GradientTransformation | None = None,
    train: TrainData | None = None,
) -> ClientProgram:
    """The default client: adapters drawn from the problem's template (one shared draw, or one
    per client), `tx` (default the problem's optimizer) and the problem's local training
    (`make_client_update`: `lax.scan` over steps) on `train` (default the problem's data)."""
    tx = tx or problem.tx()
    train = train or problem.train
    update = make_client_update(
        problem.graphdef,
        tx,
        problem.training,
        max_windows=train.max_windows(problem.training.seq_len),
    )

    def init(key: jax.Array) -> ClientState:
        n = train.num_clients
        frozen = for_clients(problem.frozen, n)
        return init_clients(problem.template, tx, n, key, shared_init=shared_init, frozen=frozen)

    return ClientProgram(init, local_training(problem, update))


def for_clients(state: PyTree, num_clients: int) -> PyTree:
    """`state` (one client's, e.g. `Problem.frozen`) repeated for every client `[N, ...]`."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *jnp.shape(x))), state)


def local_training(problem: Problem, client_update: Callable) -> Callable:
    """`update(clients, inputs)` running `client_update(client, tokens, length, mask, base)` over
    the clients with the problem's strategy, each client's frozen state merged over the base."""

    def per_client(client: ClientState, tokens, length, mask, base):
        if jax.tree.leaves(client.frozen):
            base = nnx.merge_state(base, client.frozen)
        return client_update(client, tokens, length, mask, base)

    def update(clients: ClientState, inputs: RoundInputs):
        data = inputs.data
        return train_clients(
            per_client, problem.strategy, clients, data.tokens, data.lengths, data.mask, inputs.base
        )

    return update


def scaled_tx(problem: Problem) -> optax.GradientTransformation:
    """The problem's optimizer followed by a step-size factor that `round_decayed` sets (the
    FedAMoLE reference's per-round learning rate `lr · decay^{r-1}`)."""
    return optax.chain(problem.tx(), optax.inject_hyperparams(optax.scale)(step_size=1.0))


def reset_optimizer(tx: optax.GradientTransformation, params, scale: jax.Array):
    """A fresh per-client state of `scaled_tx`'s `chain(inner, inject_hyperparams(scale))` with
    step size `scale` (the round's learning-rate factor; the reference re-creates Adam every
    round)."""
    inner, schedule = jax.vmap(tx.init)(params)
    step = jnp.full_like(schedule.hyperparams["step_size"], scale)
    return inner, schedule._replace(hyperparams={**schedule.hyperparams, "step_size": step})


def round_decayed(client: ClientProgram, tx: optax.GradientTransformation, decay: float):
    """`client` whose optimizer (`tx = scaled_tx(problem)`) is re-created at the start of every
    round `r = 0, 1, …` with its step scaled by `decay^r` (the FedAMoLE reference's AdamW
    schedule)."""

    def update(clients: ClientState, inputs: RoundInputs):
        scale = decay ** inputs.round.astype(jnp.float32)
        clients = clients._replace(opt_state=reset_optimizer(tx, clients.params, scale))
        return client.update(clients, inputs)

    return client._replace(update=update)


# ---------------------------------------------------------------------------------------------
# Server programs


def aggregating(
    aggregator: Aggregator,
    *,
    inputs: Callable[[TrainData, ClientState, dict, PyTree], dict] | None = None,
    first_round: int = 1,
    server_model: bool = False,
    frozen: bool = False,
) -> ServerProgram:
    """The server of an `Aggregator` (a pure function of the stacked client adapters).

    inputs: `(data, clients, eval_sets, base) -> inputs`, side information computed inside the
    round from the freshly trained clients (token counts, cross-evaluation perplexities).
    first_round: the first round (1-based) that ends with an aggregation; earlier rounds are local
    warm-up (`lax.cond`: neither the inputs nor the aggregation are computed there).
    frozen: the aggregator sees every client's adapters with its frozen state merged in
    (`ClientState.frozen`) and returns both (HetLoRA's self-pruning zeroes rank scales); otherwise
    the adapters alone, the frozen state untouched.
    Metrics: `applied` and, for matrix aggregators, the `matrix` in use (trust heatmaps)."""
    if first_round < 1:
        raise ValueError(f"the first aggregation round must be >= 1, got {first_round}")

    def apply(clients: ClientState, state, ri: RoundInputs):
        def aggregate(_):
            side = {} if inputs is None else inputs(ri.data, clients, ri.eval_sets, ri.base)
            if not frozen:
                return (*aggregator.apply(clients.params, state, side), clients.frozen)
            tree = nnx.merge_state(clients.params, clients.frozen)
            tree, new_state = aggregator.apply(tree, state, side)
            new_frozen, params = nnx.split_state(tree, ClientFrozen, ...)
            return params, new_state, new_frozen

        applied = ri.round + 1 >= first_round
        if first_round == 1:
            params, state, kept = aggregate(None)
        else:
            keep = lambda _: (clients.params, state, clients.frozen)
            params, state, kept = jax.lax.cond(applied, aggregate, keep, None)
        metrics = {"applied": applied}
        if isinstance(state, MixState):
            metrics["matrix"] = state.matrix
        return clients._replace(params=params, frozen=kept), state, metrics, None

    def init(key: jax.Array, clients: ClientState):
        tree = nnx.merge_state(clients.params, clients.frozen) if frozen else clients.params
        return aggregator.init(tree)

    return ServerProgram(init, apply, None, server_model)


# ---------------------------------------------------------------------------------------------
# The round


def _evaluated(method: Method, trained: ClientState, aggregated: ClientState) -> PyTree:
    if method.evaluate == "local":
        return trained.params
    if method.evaluate == "aggregated":
        return aggregated.params
    return method.evaluate(trained, aggregated)


def build(problem: Problem, method: Method) -> Algorithm:
    """`method` on `problem` as an `Algorithm` (module docstring). A cohort (`problem.cohort`)
    is refused before any compute when the method does not declare it."""
    if method.evaluate not in ("local", "aggregated") and not callable(method.evaluate):
        raise ValueError(
            f"method {method.name!r}: evaluate must be 'local', 'aggregated' or a function, got "
            f"{method.evaluate!r}"
        )
    cohort = problem.cohort
    if cohort is not None and not method.capabilities.cohorts:
        raise ValueError(
            f"method {method.name!r} does not support client cohorts (every client takes part "
            "in every round); unset data.cohort_size"
        )
    train = method.train or problem.train
    client, server = method.client, method.server

    def eval_of(trained: ClientState, aggregated: ClientState, eval_sets, base):
        params = _evaluated(method, trained, aggregated)
        n = problem.num_clients
        if jax.tree.leaves(params)[0].shape[0] != n:  # one pooled model (centralized)
            params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape[1:])), params)
        frozen = aggregated.frozen if jax.tree.leaves(aggregated.frozen) else None
        return evaluation(problem, params, eval_sets, base, method.client_eval, frozen)

    def init(key: jax.Array) -> SimState:
        clients = problem.strategy.place(client.init(key))
        if cohort is None:
            return SimState(clients, jnp.zeros((), jnp.int32), server.init(key, clients))
        first = cohorts.take(clients, jnp.arange(cohort.size))
        sim_key = jax.random.fold_in(key, cohorts.KEY_STREAM)
        return SimState(clients, jnp.zeros((), jnp.int32), server.init(key, first), sim_key)

    tx = problem.tx()

    @jax.jit
    def _round(sim: SimState, data: TrainData, eval_sets, base):
        population, population_eval = sim.clients, eval_sets
        clients = sim.clients
        if cohort is not None:
            idx = cohort.sample(jax.random.fold_in(sim.key, sim.round), data.token_counts())
            drawn, data, eval_sets = cohorts.take((sim.clients, data, eval_sets), idx)
            clients = cohort.prepare(drawn, tx)
        inputs = RoundInputs(data, eval_sets, base, sim.round)
        trained, train_metrics = client.update(clients, inputs)
        aggregated, server_state, agg_metrics, host_inputs = server.apply(
            trained, sim.agg_state, inputs
        )
        if cohort is not None:
            train_metrics = {**train_metrics, "cohort": idx}
            trained = cohorts.merge(population, idx, trained, False)
            aggregated = cohorts.merge(
                population, idx, aggregated, server.server_model and agg_metrics["applied"]
            )
        metrics = {
            "train": train_metrics,
            "aggregation": agg_metrics,
            **eval_of(trained, aggregated, population_eval, base),
        }
        new = sim._replace(clients=aggregated, round=sim.round + 1, agg_state=server_state)
        return new, metrics, host_inputs

    _evaluate = jax.jit(
        lambda sim, eval_sets, base: eval_of(sim.clients, sim.clients, eval_sets, base)
    )

    def round_fn(sim: SimState) -> tuple[SimState, Metrics]:
        new, metrics, host_inputs = _round(sim, train, problem.eval_sets, problem.base)
        if server.host is not None:
            new = server.host(new, jax.device_get(host_inputs))
        return new, metrics

    def evaluate(sim: SimState) -> Metrics:
        return _evaluate(sim, problem.eval_sets, problem.base)

    return Algorithm(method.name, init, round_fn, evaluate, method)


def federated(
    name: str,
    problem: Problem,
    aggregator: Aggregator,
    *,
    shared_init: bool,
    inputs: Callable[[TrainData, ClientState, dict, PyTree], dict] | None = None,
    first_round: int = 1,
    server_model: bool = False,
    evaluate: Evaluated = "aggregated",
    client_eval: Callable | None = None,
) -> Algorithm:
    """The method of an aggregation rule, built: the standard client (`standard_client`) and the
    aggregator's server (`aggregating`: `inputs`, `first_round`, `server_model`)."""
    method = Method(
        name,
        standard_client(problem, shared_init=shared_init),
        aggregating(aggregator, inputs=inputs, first_round=first_round, server_model=server_model),
        evaluate=evaluate,
        client_eval=client_eval,
    )
    return build(problem, method)
