"""The engine's baselines as registered methods: `local`, `fedavg`, `fedavg-tokens`,
`centralized`; FedAvg with a server optimizer (`fedavgm`, `fedadam`, `fedyogi`, `fedadagrad`); the
client-drift corrections `fedprox` and `scaffold` (`fedjax_lora.algorithms.scaffold`). Importing
this module imports every method module of the library, so the registry
(`fedjax_lora.algorithms.registry.METHODS`) holds all of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from fedjax_lora.aggregation import fedavg_aggregator, local_aggregator, with_server_optimizer
from fedjax_lora.algorithms import (  # noqa: F401  (each registers its methods)
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
from fedjax_lora.algorithms.registry import METHODS, NoOptions, get_method, register
from fedjax_lora.settings import ServerOptimizer

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
    average (the CoMiGS reference's timing; the CoMiGS grids set it). server_opt: a server
    optimizer on the pseudo-gradient (`aggregation.server_opt`; FedAvgM, FedAdam, ...).
    proximal_mu > 0: FedProx's proximal term `μ/2 ‖θ − θ_global‖²` on the local loss
    (`base.proximal`)."""

    weighting: Literal["uniform", "tokens"] = "uniform"
    evaluate: Evaluate = "aggregated"
    server_opt: ServerOptimizer = ServerOptimizer()
    proximal_mu: float = 0.0

    def __post_init__(self):
        if self.weighting not in ("uniform", "tokens"):
            raise ValueError(f"weighting must be 'uniform' or 'tokens', got {self.weighting!r}")
        if not self.proximal_mu >= 0:
            raise ValueError(f"proximal_mu must be >= 0 (0: no proximal term), got {self.proximal_mu!r}")


def fedavg(
    problem: Problem, options: FedAvgOptions = FedAvgOptions(), *, name: str = "fedavg"
) -> Algorithm:
    """FedAvg (McMahan et al., 2017) over the adapters: after every round each client receives
    `Σ_j w_j θ_j` (`FedAvgOptions`). Optimizer states stay local. All clients start from the same
    adapters. With a cohort (`data.cohort_size`) the average is over the cohort and every client
    of the population receives it (the server model). With `server_opt` the server steps the
    pseudo-gradient with an optax transformation; with `proximal_mu` the clients train FedProx's
    objective."""
    kind = SERVER_KINDS.get(name)
    if kind is not None and options.server_opt.kind != kind:
        raise ValueError(
            f"method {name!r} is FedAvg with server_opt.kind={kind!r}, got "
            f"method_options.{name}.server_opt.kind={options.server_opt.kind!r}; for another "
            "server optimizer set method_options.fedavg.server_opt.kind instead"
        )
    inputs = None
    if options.weighting == "tokens":
        inputs = lambda data, clients, eval_sets, base: {"weights": data.token_counts()}
    return federated(
        name,
        problem,
        with_server_optimizer(fedavg_aggregator(), options.server_opt),
        shared_init=True,
        inputs=inputs,
        server_model=True,
        evaluate=options.evaluate,
        proximal_mu=options.proximal_mu or None,
    )


SERVER_KINDS = {"fedavgm": "sgd", "fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}
"""FedAvg with a server optimizer (`aggregation.server_opt`), as named methods: their
`server_opt.kind`."""


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
for _name, _doc in {
    "fedavgm": "FedAvgM (Hsu et al., 2019): FedAvg whose server steps the pseudo-gradient with "
    "`optax.sgd(lr, momentum)` (defaults lr 1, momentum 0.9)",
    "fedadam": "FedAdam (Reddi et al., ICLR 2021): FedAvg whose server steps the pseudo-gradient "
    "with `optax.adam(lr, b1, b2, eps)` (defaults 1e-2, 0.9, 0.99, 1e-3)",
    "fedyogi": "FedYogi (Reddi et al., ICLR 2021): FedAvg whose server steps the pseudo-gradient "
    "with `optax.yogi(lr, b1, b2, eps)` (defaults 1e-2, 0.9, 0.99, 1e-3)",
    "fedadagrad": "FedAdagrad (Reddi et al., ICLR 2021): FedAvg whose server steps the "
    "pseudo-gradient with `optax.adagrad(lr)`, `v_{-1} = eps²` (defaults 1e-1, 1e-3)",
}.items():
    register(
        _name,
        functools.partial(fedavg, name=_name),
        FedAvgOptions(server_opt=ServerOptimizer(SERVER_KINDS[_name])),
        doc=_doc,
    )
register(
    "fedprox",
    functools.partial(fedavg, name="fedprox"),
    FedAvgOptions(proximal_mu=0.01),
    doc="FedProx (Li et al., MLSys 2020): FedAvg whose clients minimise "
    "`f(θ) + μ/2 ‖θ − θ_global‖²`, `θ_global` the adapters received at the round start",
)
