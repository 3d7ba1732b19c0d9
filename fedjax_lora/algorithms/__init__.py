"""Federated algorithms as pure `(init, round)` pairs, the method contract (`Method`: a client
program, a server program, what is evaluated, capabilities; `build`: the one round) and the
registry of named methods."""

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
from fedjax_lora.algorithms.methods import METHODS, centralized, fedavg, get_method, local, register
from fedjax_lora.algorithms.problem import Problem, Surgery, TrainData, install, model_of

__all__ = [
    "METHODS",
    "Algorithm",
    "Capabilities",
    "ClientProgram",
    "Method",
    "Problem",
    "RoundInputs",
    "ServerProgram",
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
