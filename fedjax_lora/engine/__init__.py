"""The client-stacked simulation engine: state, batches, local training, evaluation, strategies."""

from fedjax_lora.engine.batches import Batch, sample_starts, windows_at
from fedjax_lora.engine.evaluate import EvalSet, evaluate_clients, make_client_eval, make_eval_set
from fedjax_lora.engine.loss import lm_loss, token_cross_entropy
from fedjax_lora.engine.optim import OptimizerConfig, one_cycle
from fedjax_lora.engine.state import ClientState, init_clients
from fedjax_lora.engine.strategy import STRATEGIES, Strategy, map_clients
from fedjax_lora.engine.train import LocalTraining, make_client_update, train_clients

__all__ = [
    "STRATEGIES",
    "Batch",
    "ClientState",
    "EvalSet",
    "LocalTraining",
    "OptimizerConfig",
    "Strategy",
    "evaluate_clients",
    "init_clients",
    "lm_loss",
    "make_client_eval",
    "make_client_update",
    "make_eval_set",
    "map_clients",
    "one_cycle",
    "sample_starts",
    "token_cross_entropy",
    "train_clients",
    "windows_at",
]
