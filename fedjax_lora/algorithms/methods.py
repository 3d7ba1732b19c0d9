"""The engine's baselines as named methods: `local`, `fedavg`, `centralized`; FedAvg with a
server optimizer (`fedavgm`, `fedadam`, `fedyogi`, `fedadagrad`); and the client-drift
corrections `fedprox`, `scaffold` (`fedjax_lora.algorithms.scaffold`); and the trust-weighted
family (`pcl-*`, `fedjax_lora.algorithms.trust_weighted`).

Each factory maps a `Problem` to an `Algorithm`; `METHODS` is the registry the CLI lists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from fedjax_lora.aggregation import fedavg_aggregator, local_aggregator, with_server_optimizer
from fedjax_lora.algorithms import (
    comigs,
    fdlora,
    fedamole,
    fedit,
    lora_baselines,
    prompt_baselines,
    scaffold,
    trust_weighted,
)
from fedjax_lora.algorithms.base import (
    Algorithm,
    Capabilities,
    Evaluate,
    Method,
    aggregating,
    build,
    federated,
    standard_client,
)
from fedjax_lora.algorithms.problem import Problem
from fedjax_lora.settings import ServerOptimizer


def local(problem: Problem) -> Algorithm:
    """Local training only: every client trains its own adapters, nothing is exchanged; each client
    draws its own initial adapters."""
    return federated("local", problem, local_aggregator(), shared_init=False)


def fedavg(
    problem: Problem,
    weighting: Literal["uniform", "tokens"] = "uniform",
    evaluate: Evaluate = "aggregated",
    server_opt: ServerOptimizer = ServerOptimizer(),
    proximal_mu: float = 0.0,
) -> Algorithm:
    """FedAvg (McMahan et al., 2017) over the adapters: after every round each client receives
    `Σ_j w_j θ_j`, `w` uniform or proportional to the clients' training-token counts. Optimizer
    states stay local. All clients start from the same adapters. With a cohort
    (`data.cohort_size`) the average is over the cohort and every client of the population
    receives it (the server model). `evaluate="local"`: each client's model before the average
    (the CoMiGS reference's timing; the CoMiGS grids set it). `server_opt`: a server optimizer
    on the pseudo-gradient (`aggregation.server_opt`; FedAvgM, FedAdam, ...); `proximal_mu > 0`:
    FedProx's proximal term `μ/2 ‖θ − θ_global‖²` on the local loss (`base.proximal`)."""
    return _fedavg("fedavg", problem, weighting, evaluate, server_opt, proximal_mu or None)


def _fedavg(
    name: str,
    problem: Problem,
    weighting: Literal["uniform", "tokens"],
    evaluate: Evaluate,
    server_opt: ServerOptimizer,
    proximal_mu: float | None,
) -> Algorithm:
    if weighting not in ("uniform", "tokens"):
        raise ValueError(f"{name} weighting must be 'uniform' or 'tokens', got {weighting!r}")
    inputs = None
    if weighting == "tokens":
        inputs = lambda data, clients, eval_sets, base: {"weights": data.token_counts()}
    return federated(
        name,
        problem,
        with_server_optimizer(fedavg_aggregator(), server_opt),
        shared_init=True,
        inputs=inputs,
        server_model=True,
        evaluate=evaluate,
        proximal_mu=proximal_mu,
    )


def _server_optimized(name: str, kind: str, description: str) -> Callable[..., Algorithm]:
    """A registered FedAvg whose `server_opt.kind` is `kind` (its options: `fedavg`'s, with
    `server_opt` defaulting to that kind)."""

    def factory(
        problem: Problem,
        server_opt: ServerOptimizer = ServerOptimizer(kind),
        weighting: Literal["uniform", "tokens"] = "uniform",
        evaluate: Evaluate = "aggregated",
    ) -> Algorithm:
        if server_opt.kind != kind:
            raise ValueError(
                f"method {name!r} is FedAvg with server_opt.kind={kind!r}, got "
                f"method_options.{name}.server_opt.kind={server_opt.kind!r}; for another server "
                f"optimizer set method_options.fedavg.server_opt.kind instead"
            )
        return _fedavg(name, problem, weighting, evaluate, server_opt, None)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = description
    return factory


SERVER_OPTIMIZED = {
    "fedavgm": _server_optimized(
        "fedavgm",
        "sgd",
        "FedAvgM (Hsu et al., 2019): FedAvg whose server steps the pseudo-gradient with "
        "`optax.sgd(lr, momentum)` (`server_opt`; defaults lr 1, momentum 0.9).",
    ),
    "fedadam": _server_optimized(
        "fedadam",
        "adam",
        "FedAdam (Reddi et al., ICLR 2021): FedAvg whose server steps the pseudo-gradient with "
        "`optax.adam(lr, b1, b2, eps)` (`server_opt`; defaults 1e-2, 0.9, 0.99, 1e-3).",
    ),
    "fedyogi": _server_optimized(
        "fedyogi",
        "yogi",
        "FedYogi (Reddi et al., ICLR 2021): FedAvg whose server steps the pseudo-gradient with "
        "`optax.yogi(lr, b1, b2, eps)` (`server_opt`; defaults 1e-2, 0.9, 0.99, 1e-3).",
    ),
    "fedadagrad": _server_optimized(
        "fedadagrad",
        "adagrad",
        "FedAdagrad (Reddi et al., ICLR 2021): FedAvg whose server steps the pseudo-gradient "
        "with `optax.adagrad(lr)`, `v_{-1} = eps²` (`server_opt`; defaults 1e-1, 1e-3).",
    ),
}
"""FedAvg with a server optimizer (`aggregation.server_opt`), as named methods."""


def fedprox(
    problem: Problem,
    proximal_mu: float = 0.01,
    weighting: Literal["uniform", "tokens"] = "uniform",
    evaluate: Evaluate = "aggregated",
    server_opt: ServerOptimizer = ServerOptimizer(),
) -> Algorithm:
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020): FedAvg
    whose clients minimise `f(θ) + μ/2 ‖θ − θ_global‖²`, `θ_global` the adapters received at the
    round start (`base.drift_corrected`; `proximal_mu = 0` trains as FedAvg). Other options:
    `fedavg`'s."""
    return _fedavg("fedprox", problem, weighting, evaluate, server_opt, proximal_mu)


def centralized(problem: Problem) -> Algorithm:
    """One model trained on all clients' pooled training data (the upper reference of
    collaboration without personalization), evaluated on every client's sets. It trains one
    model on all the data every round, so it takes no client cohorts."""
    pooled = problem.train.pooled()
    method = Method(
        "centralized",
        standard_client(problem, shared_init=True, train=pooled),
        aggregating(local_aggregator()),
        capabilities=Capabilities(cohorts=False, data_axis=False),
        train=pooled,
    )
    return build(problem, method)


def fedavg_tokens(problem: Problem) -> Algorithm:
    """FedAvg weighted by the clients' training-token counts."""
    return fedavg(problem, weighting="tokens")


METHODS: dict[str, Callable[..., Algorithm]] = {
    "local": local,
    "fedavg": fedavg,
    "fedavg-tokens": fedavg_tokens,
    "centralized": centralized,
    **SERVER_OPTIMIZED,
    "fedprox": fedprox,
    "scaffold": scaffold.scaffold,
    **trust_weighted.METHODS,
    **fedamole.METHODS,
    **fedit.METHODS,
    **comigs.METHODS,
    **lora_baselines.METHODS,
    **prompt_baselines.METHODS,
    **fdlora.METHODS,
}


def register(name: str, factory: Callable[..., Algorithm]) -> None:
    """Adds a method to the registry (later method families register here)."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = factory


def get_method(name: str) -> Callable[..., Algorithm]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}") from None
