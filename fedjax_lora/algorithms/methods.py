"""The engine's baselines as registered methods: `local`, `fedavg`, `fedavg-tokens`,
`centralized`; importing this module imports every method module of the library, so the registry
(`fedjax_lora.algorithms.registry.METHODS`) holds all of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from fedjax_lora.aggregation import fedavg_aggregator, local_aggregator
from fedjax_lora.algorithms import (  # noqa: F401  (each registers its methods)
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
    standard_client,
)
from fedjax_lora.algorithms.problem import Problem
from fedjax_lora.algorithms.registry import METHODS, NoOptions, get_method, register

__all__ = ["METHODS", "FedAvgOptions", "centralized", "fedavg", "get_method", "local", "register"]


def local(problem: Problem, options: NoOptions = NoOptions()) -> Algorithm:
    """Local training only: every client trains its own adapters, nothing is exchanged; each client
    draws its own initial adapters."""
    del options
    return federated("local", problem, local_aggregator(), shared_init=False)


@dataclasses.dataclass(frozen=True)
class FedAvgOptions:
    """weighting: `Σ_j w_j θ_j` with `w` uniform or proportional to the clients' training-token
    counts. evaluate: `"aggregated"` (the average), or `"local"`: each client's model before the
    average (the CoMiGS reference's timing; the CoMiGS grids set it)."""

    weighting: Literal["uniform", "tokens"] = "uniform"
    evaluate: Evaluate = "aggregated"

    def __post_init__(self):
        if self.weighting not in ("uniform", "tokens"):
            raise ValueError(f"weighting must be 'uniform' or 'tokens', got {self.weighting!r}")


def fedavg(
    problem: Problem, options: FedAvgOptions = FedAvgOptions(), *, name: str = "fedavg"
) -> Algorithm:
    """FedAvg (McMahan et al., 2017) over the adapters: after every round each client receives
    `Σ_j w_j θ_j` (`FedAvgOptions`). Optimizer states stay local. All clients start from the same
    adapters. With a cohort (`data.cohort_size`) the average is over the cohort and every client
    of the population receives it (the server model)."""
    inputs = None
    if options.weighting == "tokens":
        inputs = lambda data, clients, eval_sets, base: {"weights": data.token_counts()}
    return federated(
        name,
        problem,
        fedavg_aggregator(),
        shared_init=True,
        inputs=inputs,
        server_model=True,
        evaluate=options.evaluate,
    )


def centralized(problem: Problem, options: NoOptions = NoOptions()) -> Algorithm:
    """One model trained on all clients' pooled training data (the upper reference of
    collaboration without personalization), evaluated on every client's sets. It trains one
    model on all the data every round, so it takes no client cohorts."""
    del options
    pooled = problem.train.pooled()
    method = Method(
        "centralized",
        standard_client(problem, shared_init=True, train=pooled),
        aggregating(local_aggregator()),
        capabilities=Capabilities(cohorts=False, data_axis=False),
        train=pooled,
    )
    return build(problem, method)


register("local", local)
register("fedavg", fedavg, FedAvgOptions())
register(
    "fedavg-tokens",
    functools.partial(fedavg, name="fedavg-tokens"),
    FedAvgOptions(weighting="tokens"),
    doc="FedAvg weighted by the clients' training-token counts",
)
register("centralized", centralized)
