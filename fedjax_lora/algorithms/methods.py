"""The engine's baselines as registered methods: `local`, `fedavg`, `fedavg-tokens`,
`centralized`; DP-FedAvg (`dp-fedavg`); FedAvg with a server optimizer (`fedavgm`, `fedadam`,
`fedyogi`, `fedadagrad`); the client-drift corrections `fedprox` and `scaffold`
(`fedjax_lora.algorithms.scaffold`). Importing this module imports every method module of the
library, so the registry (`fedjax_lora.algorithms.registry.METHODS`) holds all of them.
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
    nothing,
    standard_client,
)
from fedjax_lora.algorithms.problem import Problem
from fedjax_lora.algorithms.registry import METHODS, NoOptions, get_method, register
from fedjax_lora.errors import ConfigError
from fedjax_lora.settings import CLIENT_AXIS, DPOptions, ServerOptimizer

__all__ = ["METHODS", "FedAvgOptions", "centralized", "fedavg", "get_method", "local", "register"]


def local(problem: Problem, options: NoOptions = NoOptions()) -> Algorithm:
    """Local training only: every client trains its own adapters, nothing is exchanged; each client
    draws its own initial adapters."""
    del options
    return federated("local", problem, local_aggregator(), shared_init=False, comm=nothing)


@dataclasses.dataclass(frozen=True)
class FedAvgOptions:
    """weighting: `Σ_j w_j θ_j` with `w` uniform or proportional to the clients' training-token
    counts. evaluate: `"aggregated"` (the average), or `"local"`: each client's model before the
    average (the CoMiGS reference's timing; the CoMiGS grids set it). server_opt: a server
    optimizer on the pseudo-gradient (`aggregation.server_opt`; FedAvgM, FedAdam, ...).
    proximal_mu > 0: FedProx's proximal term `μ/2 ‖θ − θ_global‖²` on the local loss
    (`base.proximal`). dp: client-level DP of the average (`settings.DPOptions`: DP-FedAvg,
    McMahan et al., ICLR 2018; clipping, Gaussian noise, `ε` reported per round; the same as the
    config's `aggregation.dp`); None: off."""

    weighting: Literal["uniform", "tokens"] = "uniform"
    evaluate: Evaluate = "aggregated"
    server_opt: ServerOptimizer = ServerOptimizer()
    proximal_mu: float = 0.0
    dp: DPOptions | None = None

    def __post_init__(self):
        if self.weighting not in ("uniform", "tokens"):
            raise ValueError(f"weighting must be 'uniform' or 'tokens', got {self.weighting!r}")
        if not self.proximal_mu >= 0:
            raise ValueError(
                f"proximal_mu must be >= 0 (0: no proximal term), got {self.proximal_mu!r}"
            )


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
    if options.dp is not None:
        problem = _with_dp(problem, options.dp, name)
    elif name == "dp-fedavg":
        raise ConfigError("method_options.dp-fedavg.dp is null; give DP options or run fedavg")
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
        proximal_mu=options.proximal_mu or None,
        policy="all",
        server_opt=options.server_opt,
    )


def _with_dp(problem: Problem, dp: DPOptions, name: str) -> Problem:
    """The problem whose global rule is DP-FedAvg with `dp` (`algorithms.base.with_global_rule`),
    refusing a second source of DP or a robust reduction."""
    rule = problem.global_rule
    if rule.dp is not None:
        raise ConfigError(
            f"method_options.{name}.dp and aggregation.dp both set DP; unset one of them"
        )
    if rule.reduction != "mean":
        raise ConfigError(
            f"method_options.{name}.dp certifies the clipped mean, not aggregation.reduction = "
            f"{rule.reduction!r}; set aggregation.reduction=mean"
        )
    return dataclasses.replace(problem, global_rule=dataclasses.replace(rule, dp=dp))


SERVER_KINDS = {"fedavgm": "sgd", "fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}
"""FedAvg with a server optimizer (`aggregation.server_opt`), as named methods: their
`server_opt.kind`."""


def centralized(problem: Problem, options: NoOptions = NoOptions()) -> Algorithm:
    """One model trained on all clients' pooled training data (the upper reference of
    collaboration without personalization), evaluated on every client's sets. It trains one
    model on all the data every round, so it takes no client cohorts, and under the `sharded`
    strategy it needs one client group (`strategy.model_devices` = the number of devices it
    uses: the base sharded over them); more groups are refused."""
    del options
    strategy = problem.strategy
    if strategy.kind == "sharded" and (groups := strategy.mesh().shape[CLIENT_AXIS]) > 1:
        raise ConfigError(
            f"centralized trains one pooled client, which strategy 'sharded' cannot split over "
            f"{groups} client groups of devices; set strategy.kind to map or vmap, or "
            "strategy.model_devices to the device count"
        )
    pooled = problem.train.pooled()
    method = Method(
        "centralized",
        standard_client(problem, shared_init=True, train=pooled),
        aggregating(local_aggregator(), comm=nothing),
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
register(
    "dp-fedavg",
    functools.partial(fedavg, name="dp-fedavg"),
    FedAvgOptions(dp=DPOptions()),
    doc="DP-FedAvg (McMahan et al., ICLR 2018): FedAvg of client updates clipped to "
    "`dp.clip_norm`, Gaussian noise `N(0, (z C / K)^2)` on the mean; `ε` at `dp.delta` reported "
    "every round",
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
