"""Federated algorithms as pure `(init, round)` pairs, the method contract (`Method`: a client
program, a server program, what is evaluated, capabilities, final analyses; `build`: the one
round; `uses`: the side data a method reads) and the registry of named methods."""

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
    side_data,
    standard_client,
    uses,
)
from fedjax_lora.algorithms.methods import METHODS, centralized, fedavg, get_method, local, register
from fedjax_lora.algorithms.problem import Problem, SideData, TrainData

__all__ = [
    "METHODS",
    "Algorithm",
    "Capabilities",
    "ClientProgram",
    "Method",
    "Problem",
    "RoundInputs",
    "ServerProgram",
    "SideData",
    "SimState",
    "TrainData",
    "aggregating",
    "build",
    "centralized",
    "evaluation",
    "federated",
    "fedavg",
    "get_method",
    "local",
    "register",
    "side_data",
    "standard_client",
    "uses",
]
