"""Federated algorithms as pure `(init, round)` pairs, and the registry of named methods."""

from fedjax_lora.algorithms.base import Algorithm, SimState, evaluation, federated
from fedjax_lora.algorithms.methods import METHODS, centralized, fedavg, get_method, local, register
from fedjax_lora.algorithms.problem import Problem, TrainData

__all__ = [
    "METHODS",
    "Algorithm",
    "Problem",
    "SimState",
    "TrainData",
    "centralized",
    "evaluation",
    "federated",
    "fedavg",
    "get_method",
    "local",
    "register",
]
