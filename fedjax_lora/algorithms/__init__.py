"""Federated algorithms as pure `(init, round)` pairs, the method contract (`Method`: a client
program, a server program, what is evaluated, capabilities, final analyses; `build`: the one
round) and the one registry of named methods (`register(name, factory, options, side=...)`,
`fedjax_lora.algorithms.registry`; `side`: the `SideData` a method reads)."""

from fedjax_lora.algorithms.base import (
    Algorithm,
    Capabilities,
    ClientProgram,
    Method,
    RoundInputs,
    ServerProgram,
    SimState,
    aggregating,
    build,
    evaluation,
    federated,
    standard_client,
)
from fedjax_lora.algorithms.methods import FedAvgOptions, centralized, fedavg, local
from fedjax_lora.algorithms.problem import (
    Problem,
    SideData,
    Surgery,
    TrainData,
    install,
    model_of,
)
from fedjax_lora.algorithms.registry import METHODS, MethodSpec, NoOptions, get_method, register

__all__ = [
    "METHODS",
    "Algorithm",
    "Capabilities",
    "ClientProgram",
    "FedAvgOptions",
    "Method",
    "MethodSpec",
    "NoOptions",
    "Problem",
    "RoundInputs",
    "ServerProgram",
    "SideData",
    "SimState",
    "Surgery",
    "TrainData",
    "aggregating",
    "build",
    "centralized",
    "evaluation",
    "federated",
    "fedavg",
    "get_method",
    "install",
    "local",
    "model_of",
    "register",
    "standard_client",
]
