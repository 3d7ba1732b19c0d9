"""The one federated round, and a method as a value plugged into it.

A method (`Method`) is data: a client program (`ClientProgram`: initial per-client state, local
update), a server program (`ServerProgram`: initial server state, a pure `apply` inside the round
that returns the clients after aggregation, the server state, metrics and host inputs, and an
optional `host` step outside `jit`, e.g. FedAMoLE's assignment LP), which adapters are
evaluated (`evaluate`: the locally trained ones before aggregation, the aggregated ones, or a
function of both), declared capabilities (`Capabilities`: client cohorts, vectorized
sweeps) and its final analyses (`analyses`: e.g. FedAMoLE's expert assignment).
`build(problem, method)` turns it into an `Algorithm`: `init`, the compiled `round`,
`evaluate`. Every method of the library is built by it; none writes its own round. The data a
method reads besides the clients' training and evaluation data (`SideData`: an auxiliary split,
reference sequences, known mixtures) is declared with its registration (`register(...,
side=SideData(...))`), so the problem builder provides it only for the methods run.

A server also declares what a round moves (`ServerProgram.comm`: the bytes each client uploads
and downloads, host-side, from the initial clients' shapes) and, when its aggregation is the
mean of a *global part* (`ServerProgram.global_part`), lets `build` replace that mean by the
problem's `GlobalRule` (`with_global_rule`: a robust reduction, or client-level DP whose `ε` the
run reports).

The round (compiled once; the round counter is data, so later rounds never recompile):

    [cohort] draw K clients, gather their state, data, evaluation windows and side data
    clients, train = client.update(clients, RoundInputs(data, eval_sets, base, round, server, side))
    clients', server, agg, host_in = server.apply(clients, server, inputs)   # aggregation
    [cohort] scatter the rows back (server.server_model, the server model or global part, to all)
    metrics = {"train": train, "aggregation": agg, <set>: evaluate(clients, clients')}
    (host) sim = server.host(sim, host_in)                                   # outside jit

Every metric of `train` and `aggregation` reaches the run's `metrics.jsonl`, namespaced by the
method (`experiment._round_record`).

Per-client frozen state (`ClientState.frozen`: the `ClientFrozen` variables of the problem's
model, e.g. CoMiGS's and FedAMoLE's expert masks, HetLoRA's rank scales; every client starts from
the problem's `frozen` template unless its method sets them) is merged over the shared base for
that client in training and evaluation. `server` in the clients' inputs is the server state at
the round start (what they download besides their adapters: SCAFFOLD's `c`). Client-drift
corrections (FedProx, SCAFFOLD) are combinators over the standard client: `drift_corrected`,
`proximal`, `anchored`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_lora.aggregation import (
    Aggregator,
    Exchange,
    MixState,
    dp_aggregator,
    global_exchange,
    krum_aggregator,
    median_aggregator,
    trimmed_mean_aggregator,
    with_server_optimizer,
)
from fedjax_lora.aggregation.dp import DPState, update_noise_multiplier
from fedjax_lora.aggregation.masks import PolicyArg, global_mask
from fedjax_lora.aggregation.privacy import check_certifiable
from fedjax_lora.algorithms.problem import PER_CLIENT_SIDE, Problem, TrainData
from fedjax_lora.engine import cohort as cohorts
from fedjax_lora.engine.evaluate import EvalSet, evaluate_clients, make_client_eval
from fedjax_lora.engine.instruction import make_client_task
from fedjax_lora.engine.optim import standard_promotion
from fedjax_lora.engine.state import ClientState, init_clients
from fedjax_lora.engine.strategy import map_clients
from fedjax_lora.engine.train import make_client_update, train_clients
from fedjax_lora.errors import ConfigError
from fedjax_lora.models.layers import ClientFrozen
from fedjax_lora.settings import DPOptions, GlobalRule, ServerOptimizer
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
    evaluation sets, the shared base, the 0-based index of this round, the server's state at
    the round start (`SimState.agg_state`: what the clients download besides their adapters,
    e.g. SCAFFOLD's server control variate) and the side data (`Problem.side`, a cohort's)."""

    data: TrainData
    eval_sets: dict
    base: PyTree
    round: jax.Array
    server: PyTree = None
    side: dict | None = None

    def windows(self, name: str) -> EvalSet:
        """The window set `name`: the auxiliary side data (`aux`) or an evaluation set
        (`Problem.windows`)."""
        return (self.side or {})[name] if name == "aux" else self.eval_sets[name]


class ClientProgram(NamedTuple):
    """`init(key) -> ClientState [N]`; `update(clients, inputs) -> (clients, metrics)`, the local
    work of every client in one round (inside `jit`; `metrics["train_loss"]` is `[N, steps]`)."""

    init: Callable[[jax.Array], ClientState]
    update: Callable[[ClientState, RoundInputs], tuple[ClientState, Metrics]]


Comm = Callable[[ClientState], Exchange]
"""`comm(clients) -> Exchange`: the bytes each client uploads and downloads in a round that
aggregates (int arrays `[N]`), on the host from the initial clients `[N]` (their shapes, and the
ranks or expert masks they hold)."""


def exchanged(policy: PolicyArg = "all") -> Comm:
    """Every client uploads the `policy`'s global part of its adapters and downloads it back
    (`aggregation.global_exchange`): FedAvg, a personalized mixing of whole adapters, FedSA-LoRA's
    `A`, CoMiGS's generalist."""

    def comm(clients: ClientState) -> Exchange:
        one = global_exchange(clients.params, policy)
        return per_client(one, num_rows(clients.params))

    return comm


def per_client(one: Exchange, n: int) -> Exchange:
    """One client's `Exchange` as the same int64 arrays `[n]` for every client."""
    return Exchange(np.full(n, one.upload, np.int64), np.full(n, one.download, np.int64))


def num_rows(stacked: PyTree) -> int:
    return int(jax.tree.leaves(stacked)[0].shape[0])


def nothing(clients: ClientState) -> Exchange:
    """A server that exchanges nothing (local training, one pooled model)."""
    return per_client(Exchange(0, 0), num_rows(clients.params))


class GlobalPart(NamedTuple):
    """A server whose aggregation is the mean of `policy`'s global part (`aggregation.masks`);
    `rebuild(aggregator)`: the same server with `aggregator`, a rule over that part, in place of
    the mean (`with_global_rule`). The part is what the server's own rule averages: the tensors
    themselves, or a view of them that the server forms and hands the rule (HetLoRA's truncated
    factors, FlexLoRA's products `ΔW_i`, `aggregation.ranks.rule_reduce`)."""

    policy: PolicyArg
    rebuild: Callable[[Aggregator], ServerProgram]


class ServerProgram(NamedTuple):
    """`init(key, clients) -> state` from the simulation's key (the one the client program's
    `init` got) and the initial (cohort's) clients; `apply(clients, state,
    inputs) -> (clients, state, metrics, host_inputs)` (pure, inside `jit`): the clients after
    aggregation; `host(sim, host_inputs) -> sim` (optional, on the host after the compiled round,
    e.g. an LP); `server_model`: what the aggregation makes one model for everyone, so under a
    cohort the idle clients receive it too (True: every adapter; a policy: its global part;
    False: nothing, personalised aggregation); `comm`: what each client uploads and downloads in
    a round that aggregates (`Comm`; None: not declared, no bytes reported); `global_part`: the
    server's aggregation is the mean of a global part, replaceable (`GlobalPart`); `own_rule`: for
    a server without one, why no `GlobalRule` can replace its aggregation (the refusal names it);
    `dp`: the client-level DP it applies (set by `with_global_rule`; the run reports `ε`)."""

    init: Callable[[jax.Array, ClientState], PyTree]
    apply: Callable[[ClientState, PyTree, RoundInputs], tuple[ClientState, PyTree, Metrics, PyTree]]
    host: Callable[[SimState, PyTree], SimState] | None = None
    server_model: bool | PolicyArg = False
    comm: Comm | None = None
    global_part: GlobalPart | None = None
    dp: DPOptions | None = None
    own_rule: str | None = None


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
    the pooled streams of all clients as one client). analyses: `fn(sim, tokenizer) -> entries`
    added to the record of a run's last round (FedAMoLE's expert assignment `experts`, the
    CoMiGS family's routing analysis `routing`); `tokenizer` decodes token ids (None: ids)."""

    name: str
    client: ClientProgram
    server: ServerProgram
    evaluate: Evaluated = "aggregated"
    capabilities: Capabilities = Capabilities()
    client_eval: Callable | None = None
    train: TrainData | None = None
    analyses: Callable[[SimState, Any], dict[str, Any]] | None = None


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


class DriftState(NamedTuple):
    """The round's state of `drift_corrected` (first in each client's optimizer state), set by
    `anchored` at every round start: `anchor`, the adapters the client received (`θ_global`),
    and `correction`, a constant added to every update of the round (SCAFFOLD's
    `η_l (c_i − c)`; zeros otherwise)."""

    anchor: PyTree
    correction: PyTree


def drift_corrected(tx: optax.GradientTransformation, mu: float) -> optax.GradientTransformation:
    r"""`tx` on FedProx's gradient, plus a constant correction of its update:

    .. math:: u = \mathrm{tx}\big(g(θ) + μ\,(θ − θ_{global})\big) + δ,

    :math:`g + μ(θ − θ_{global})` the gradient of FedProx's local objective
    :math:`f(θ) + \tfrac{μ}{2}\lVert θ − θ_{global}\rVert^2` (Li et al., "Federated Optimization in
    Heterogeneous Networks", MLSys 2020) and :math:`δ = η_l (c_i − c)` SCAFFOLD's control-variate
    correction (Karimireddy et al., ICML 2020): with `tx = sgd(η_l)` the step is the paper's
    :math:`−η_l (g − c_i + c)`; with an adaptive `tx` the correction stays in update units, the
    units of :math:`c_i = (x − y_i)/(K η_l)`. `θ_global` and `δ` are the `DriftState` (`anchored`
    sets it every round); the state is `(DriftState, tx's state)`. The reported training loss
    is `f` alone."""
    inner_tx = standard_promotion(tx)  # optax mixes Python floats with its int32 counter

    def init(params: PyTree) -> tuple[DriftState, optax.OptState]:
        return DriftState(params, jax.tree.map(jnp.zeros_like, params)), inner_tx.init(params)

    def update(grads: PyTree, state: tuple[DriftState, optax.OptState], params: PyTree):
        drift, inner = state
        grads = jax.tree.map(lambda g, p, a: g + mu * (p - a), grads, params, drift.anchor)
        updates, inner = inner_tx.update(grads, inner, params)
        return jax.tree.map(jnp.add, updates, drift.correction), (drift, inner)

    return optax.GradientTransformation(init, update)


def proximal(problem: Problem, mu: float) -> Problem:
    """`problem` whose clients optimise with `drift_corrected(problem.tx(), mu)` (FedProx's
    proximal weight `mu`; every method's `proximal_mu` option)."""
    if not mu >= 0:
        raise ValueError(f"proximal_mu must be >= 0 (0: no proximal term), got {mu}")
    return dataclasses.replace(problem, optimizer=drift_corrected(problem.tx(), mu))


def anchored(
    client: ClientProgram,
    correction: Callable[[ClientState, RoundInputs], PyTree] | None = None,
) -> ClientProgram:
    """`client` (optimizer `drift_corrected`, e.g. of a `proximal` problem) with its `DriftState`
    set at the start of every round: the anchor to the adapters just received, the correction to
    `correction(clients, inputs)` (`[N, ...]`; default zeros)."""

    def update(clients: ClientState, inputs: RoundInputs):
        params = clients.params
        if correction is None:
            c = jax.tree.map(jnp.zeros_like, params)
        else:
            c = correction(clients, inputs)
        _, inner = clients.opt_state
        clients = clients._replace(opt_state=(DriftState(params, c), inner))
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
    policy: PolicyArg | None = None,
    server_opt: ServerOptimizer | None = None,
    comm: Comm | None = None,
    frozen: bool = False,
) -> ServerProgram:
    """The server of an `Aggregator` (a pure function of the stacked client adapters).

    inputs: `(data, clients, eval_sets, base) -> inputs`, side information computed inside the
    round from the freshly trained clients (token counts, cross-evaluation perplexities).
    first_round: the first round (1-based) that ends with an aggregation; earlier rounds are local
    warm-up (`lax.cond`: neither the inputs nor the aggregation are computed there).
    policy: the aggregator is the mean of this global part (`GlobalPart`: a `GlobalRule` may
    replace it; `"none"`: nothing is global, nothing exchanged); that part is one model after an
    aggregation, which idle clients of a cohort receive too (`server_model`, also when not
    given as True). server_opt: a server optimizer
    stepping the aggregate of that part (`aggregation.with_server_optimizer`; it stays around a
    replacing rule). comm: the bytes moved (default `exchanged(policy or "all")`, the whole
    adapters when no policy is declared).
    frozen: the aggregator sees every client's adapters with its frozen state merged in
    (`ClientState.frozen`) and returns both (HetLoRA's self-pruning zeroes rank scales); otherwise
    the adapters alone, the frozen state untouched.
    Metrics: `applied` and, for matrix aggregators, the `matrix` in use (trust heatmaps)."""
    if policy == "none":
        policy, comm = None, comm or nothing
    comm = comm or exchanged(policy or "all")
    server_model = server_model or (False if policy is None else policy)
    stepped = lambda rule: with_server_optimizer(
        rule, server_opt or ServerOptimizer(), policy or "all"
    )
    part = None
    if policy is not None:
        rebuild = lambda rule: _aggregator_server(
            stepped(rule), inputs, first_round, server_model, comm, None, frozen
        )
        part = GlobalPart(policy, rebuild)
    return _aggregator_server(
        stepped(aggregator), inputs, first_round, server_model, comm, part, frozen
    )


def _aggregator_server(
    aggregator: Aggregator,
    inputs: Callable | None,
    first_round: int,
    server_model: bool | PolicyArg,
    comm: Comm,
    part: GlobalPart | None,
    frozen: bool,
) -> ServerProgram:
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

    return ServerProgram(init, apply, None, server_model, comm, part)


# ---------------------------------------------------------------------------------------------
# The global part's rule

DP_KEY_STREAM = 0x6470  # the DP noise key is fold_in(init key, DP_KEY_STREAM)


def robust_aggregator(rule: GlobalRule, policy: PolicyArg, clients: int) -> Aggregator:
    """The `rule.reduction` of `policy`'s global part over `clients` clients a round, refusing
    (`ConfigError`) settings that reduce to the mean or cannot hold."""
    if rule.reduction == "median":
        return median_aggregator(policy)
    if rule.reduction == "trimmed_mean":
        if int(rule.beta * clients) == 0:
            raise ConfigError(
                f"aggregation.beta = {rule.beta} trims no value of {clients} clients "
                f"(floor(beta * clients) = 0: the plain mean); set aggregation.beta >= "
                f"{1 / clients:.3g}"
            )
        return trimmed_mean_aggregator(rule.beta, policy)
    if not 2 * rule.f + 2 < clients:
        raise ConfigError(
            f"aggregation.f = {rule.f}: Krum needs more than 2f + 2 clients a round, got "
            f"{clients}; lower aggregation.f (at most {(clients - 3) // 2}) or add clients"
        )
    m = 1 if rule.reduction == "krum" else rule.m
    if m is not None and m > clients:
        raise ConfigError(
            f"aggregation.m = {m} exceeds the {clients} clients a round; lower aggregation.m"
        )
    return krum_aggregator(rule.f, m, policy)


def private_aggregator(
    dp: DPOptions, policy: PolicyArg, clients: int, population: int, sampling: str | None
) -> Aggregator:
    """DP-FedAvg (`aggregation.dp_aggregator`) of `policy`'s global part over `clients` of
    `population` clients a round (`sampling`: the cohort's draw, None: everyone), refusing
    (`ConfigError`) what the accountant cannot certify."""
    if sampling not in (None, "uniform"):
        raise ConfigError(
            f"dp: data.cohort_sampling = {sampling!r} draws clients by token counts, which the "
            "accountant cannot certify; set data.cohort_sampling=uniform"
        )
    cohort = None if clients == population else clients
    check_certifiable(dp.noise_multiplier, dp.delta, population, cohort)
    if dp.adaptive_quantile is not None:
        sigma_b = clients / 20 if dp.count_noise_std is None else dp.count_noise_std
        try:
            update_noise_multiplier(dp.noise_multiplier, sigma_b)
        except ValueError:
            raise ConfigError(
                f"dp.count_noise_std = {sigma_b:g} (default clients/20): adaptive clipping needs "
                f"2 * count_noise_std > dp.noise_multiplier = {dp.noise_multiplier}; raise "
                "dp.count_noise_std or lower dp.noise_multiplier"
            ) from None
    return dp_aggregator(
        clip_norm=dp.clip_norm,
        noise_multiplier=dp.noise_multiplier,
        adaptive_quantile=dp.adaptive_quantile,
        clip_lr=dp.clip_lr,
        count_noise_std=dp.count_noise_std,
        policy=policy,
    )


def with_global_rule(method: Method, rule: GlobalRule, problem: Problem) -> Method:
    """`method` with its global part reduced by `rule` (`GlobalRule`): a robust reduction or
    DP-FedAvg in place of the mean (`ServerProgram.global_part`); the DP noise key drawn from the
    simulation's key (`fold_in(key, DP_KEY_STREAM)`, set in every `DPState` of the checkpointed
    server state, wherever the server keeps it). A method that exchanges nothing is unchanged; one
    whose server is not a mean over a global part (trust mixing, SCAFFOLD, ...) is refused
    (`ConfigError`, with the server's `own_rule` as the reason when it declares one)."""
    server = method.server
    if rule.default or server.comm is nothing:
        return method
    if server.global_part is None:
        setting, fix = f"aggregation.reduction = {rule.reduction}", "set aggregation.reduction=mean"
        if rule.dp is not None:
            setting, fix = "aggregation.dp", "unset aggregation.dp"
        why = server.own_rule or "its server is its own rule"
        raise ConfigError(
            f"method {method.name!r} has no global part (a tensor set averaged into one model) "
            f"for {setting}: {why}; {fix} or drop the method"
        )
    policy = server.global_part.policy
    cohort = problem.cohort
    clients = problem.num_clients if cohort is None else cohort.size
    if rule.dp is None:
        return method._replace(
            server=server.global_part.rebuild(robust_aggregator(rule, policy, clients))
        )
    aggregator = private_aggregator(
        rule.dp, policy, clients, problem.num_clients, None if cohort is None else cohort.sampling
    )
    private = server.global_part.rebuild(aggregator)

    def init(key: jax.Array, clients: ClientState):
        noise_key = jax.random.key_data(jax.random.fold_in(key, DP_KEY_STREAM))
        dp_state = lambda s: isinstance(s, DPState)  # alone, in a ServerOptState or a server's own
        return jax.tree.map(
            lambda s: s._replace(key=noise_key) if dp_state(s) else s,
            private.init(key, clients),
            is_leaf=dp_state,
        )

    return method._replace(server=private._replace(init=init, dp=rule.dp))


# ---------------------------------------------------------------------------------------------
# The round


def _evaluated(method: Method, trained: ClientState, aggregated: ClientState) -> PyTree:
    if method.evaluate == "local":
        return trained.params
    if method.evaluate == "aggregated":
        return aggregated.params
    return method.evaluate(trained, aggregated)


def build(problem: Problem, method: Method) -> Algorithm:
    """`method` on `problem` as an `Algorithm` (module docstring), its global part reduced by
    `problem.global_rule` (`with_global_rule`). A cohort (`problem.cohort`) is refused before any
    compute when the method does not declare it."""
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
    method = with_global_rule(method, problem.global_rule, problem)
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
    def _round(sim: SimState, data: TrainData, eval_sets, side, base):
        population, population_eval = sim.clients, eval_sets
        clients = sim.clients
        if cohort is not None:
            idx = cohort.sample(jax.random.fold_in(sim.key, sim.round), data.token_counts())
            per_client = {k: v for k, v in side.items() if k in PER_CLIENT_SIDE}
            drawn, data, eval_sets, per_client = cohorts.take(
                (sim.clients, data, eval_sets, per_client), idx
            )
            clients = cohort.prepare(drawn, tx)
            side = {**side, **per_client}
        inputs = RoundInputs(data, eval_sets, base, sim.round, sim.agg_state, side)
        trained, train_metrics = client.update(clients, inputs)
        aggregated, server_state, agg_metrics, host_inputs = server.apply(
            trained, sim.agg_state, inputs
        )
        if cohort is not None:
            train_metrics = {**train_metrics, "cohort": idx}
            trained = cohorts.merge(population, idx, trained, False)
            shared = server.server_model
            if not isinstance(shared, bool):  # a policy: its global part
                shared = global_mask(population.params, shared)
            aggregated = cohorts.merge(population, idx, aggregated, shared, agg_metrics["applied"])
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
        new, metrics, host_inputs = _round(
            sim, train, problem.eval_sets, problem.side, problem.base
        )
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
    proximal_mu: float | None = None,
    policy: PolicyArg | None = None,
    server_opt: ServerOptimizer | None = None,
    comm: Comm | None = None,
) -> Algorithm:
    """The method of an aggregation rule, built: the standard client (`standard_client`) and the
    aggregator's server (`aggregating`: `inputs`, `first_round`, `server_model`, `policy`,
    `server_opt`, `comm`).
    proximal_mu: FedProx's proximal term on the local loss (`proximal`, `anchored`); None: none
    (0 adds it with weight 0, the same updates)."""
    if proximal_mu is not None:
        problem = proximal(problem, proximal_mu)
    client = standard_client(problem, shared_init=shared_init)
    server = aggregating(
        aggregator,
        inputs=inputs,
        first_round=first_round,
        server_model=server_model,
        policy=policy,
        server_opt=server_opt,
        comm=comm,
    )
    method = Method(
        name,
        client if proximal_mu is None else anchored(client),
        server,
        evaluate=evaluate,
        client_eval=client_eval,
    )
    return build(problem, method)
