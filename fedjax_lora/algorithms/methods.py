"""The engine's baselines as named methods: `local`, `fedavg`, `dp-fedavg`, `centralized`; and
the trust-weighted family (`pcl-*`, `fedjax_lora.algorithms.trust_weighted`).

Each factory maps a `Problem` to an `Algorithm`; `METHODS` is the registry the CLI lists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

from fedjax_lora.aggregation import fedavg_aggregator, local_aggregator
from fedjax_lora.algorithms import (
    comigs,
    fdlora,
    fedamole,
    fedit,
    lora_baselines,
    prompt_baselines,
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
    nothing,
    standard_client,
)
from fedjax_lora.algorithms.problem import Problem
from fedjax_lora.errors import ConfigError
from fedjax_lora.settings import DPOptions


def local(problem: Problem) -> Algorithm:
    """Local training only: every client trains its own adapters, nothing is exchanged; each client
    draws its own initial adapters."""
    return federated("local", problem, local_aggregator(), shared_init=False, comm=nothing)


def fedavg(
    problem: Problem,
    weighting: Literal["uniform", "tokens"] = "uniform",
    evaluate: Evaluate = "aggregated",
) -> Algorithm:
    """FedAvg (McMahan et al., 2017) over the adapters: after every round each client receives
    `Σ_j w_j θ_j`, `w` uniform or proportional to the clients' training-token counts. Optimizer
    states stay local. All clients start from the same adapters. With a cohort
    (`data.cohort_size`) the average is over the cohort and every client of the population
    receives it (the server model). `evaluate="local"`: each client's model before the average
    (the CoMiGS reference's timing; the CoMiGS grids set it)."""
    return _fedavg("fedavg", problem, weighting, evaluate)


def _fedavg(name: str, problem: Problem, weighting: str, evaluate: Evaluate) -> Algorithm:
    if weighting not in ("uniform", "tokens"):
        raise ValueError(f"fedavg weighting must be 'uniform' or 'tokens', got {weighting!r}")
    inputs = None
    if weighting == "tokens":
        inputs = lambda data, clients, eval_sets, base: {"weights": data.token_counts()}
    return federated(
        name,
        problem,
        fedavg_aggregator(),
        shared_init=True,
        inputs=inputs,
        server_model=True,
        evaluate=evaluate,
        policy="all",
    )


def dp_fedavg(
    problem: Problem, dp: DPOptions = DPOptions(), evaluate: Evaluate = "aggregated"
) -> Algorithm:
    """DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models",
    ICLR 2018): FedAvg of the clients' updates clipped to `dp.clip_norm` in L2 norm, with Gaussian
    noise `N(0, (z C / K)^2)` on the mean of the `K` clients of a round (the uniform mean; adaptive
    clipping with `dp.adaptive_quantile`, Andrew et al. 2021). The run reports `ε` at `dp.delta`
    every round (`fedjax_lora.aggregation.privacy`, cohorts of `data.cohort_size` taken into
    account) and refuses settings the accountant cannot certify. The same as `fedavg` with the
    config's `aggregation.dp`."""
    if problem.global_rule.dp is not None:
        raise ConfigError(
            "dp-fedavg takes its DP options from method_options.dp-fedavg.dp; unset aggregation.dp "
            "(or run fedavg with it)"
        )
    if problem.global_rule.reduction != "mean":
        raise ConfigError(
            f"dp-fedavg certifies the clipped mean, not aggregation.reduction = "
            f"{problem.global_rule.reduction!r}; set aggregation.reduction=mean"
        )
    rule = dataclasses.replace(problem.global_rule, dp=dp)
    return _fedavg("dp-fedavg", dataclasses.replace(problem, global_rule=rule), "uniform", evaluate)


def centralized(problem: Problem) -> Algorithm:
    """One model trained on all clients' pooled training data (the upper reference of
    collaboration without personalization), evaluated on every client's sets. It trains one
    model on all the data every round, so it takes no client cohorts."""
    pooled = problem.train.pooled()
    method = Method(
        "centralized",
        standard_client(problem, shared_init=True, train=pooled),
        aggregating(local_aggregator(), comm=nothing),
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
    "dp-fedavg": dp_fedavg,
    "centralized": centralized,
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
