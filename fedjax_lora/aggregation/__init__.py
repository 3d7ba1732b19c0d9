"""Pure aggregators over stacked client trees (leaves `[N, ...]`): mixing, FedAvg, trust rules.

`core`: mixing, FedAvg, local, the optax-style `Aggregator` protocol and its factories. `trust`:
the trust matrices of Wagner, Fan & Jaggi (COLM 2024). `registry`: every aggregator by name.
`ranks`, `hetlora`, `flexlora`: heterogeneous LoRA ranks (zero-padded, masked) and the HetLoRA and
FlexLoRA servers (not mixing matrices, so outside the registry's battery). `robust`: median,
trimmed mean, Krum; `server_opt`: optax server optimizers (FedAvgM, FedAdam, FedYogi,
FedAdagrad); `dp`: client-level DP (clipping, noise, adaptive clipping); `privacy`: the
`dp-accounting` accountant; `comm`: bytes exchanged per client and round.
"""

from fedjax_lora.aggregation.comm import (
    Exchange,
    global_exchange,
    logits_exchange,
    model_exchange,
    rank_exchange,
    tree_bytes,
)
from fedjax_lora.aggregation.core import (
    INPUT_CLIENT_AXES,
    TRUST_RULES,
    Aggregator,
    Inputs,
    MixState,
    fedavg,
    fedavg_aggregator,
    fedavg_matrix,
    local,
    local_aggregator,
    mix,
    num_clients,
    trust_aggregator,
)
from fedjax_lora.aggregation.dp import DPState, dp_aggregator
from fedjax_lora.aggregation.experts import expert_aggregator, holder_average
from fedjax_lora.aggregation.flexlora import flexlora_aggregator
from fedjax_lora.aggregation.hetlora import HetLoRAState, hetlora_aggregator
from fedjax_lora.aggregation.registry import AGGREGATORS, AggregatorEntry, make_aggregator
from fedjax_lora.aggregation.robust import (
    krum_aggregator,
    krum_scores,
    median_aggregator,
    trimmed_mean_aggregator,
)
from fedjax_lora.aggregation.server_opt import (
    ServerOptimizer,
    ServerOptState,
    fedadagrad,
    fedadam,
    fedavgm,
    fedyogi,
    server_optimizer,
    with_server_optimizer,
)
from fedjax_lora.aggregation.trust import (
    TOPOLOGIES,
    oracle_trust,
    prediction_trust,
    softmax_trust,
    topology,
    validation_trust,
    weight_similarity,
    weight_similarity_scores,
)

__all__ = [
    "AGGREGATORS",
    "INPUT_CLIENT_AXES",
    "TOPOLOGIES",
    "TRUST_RULES",
    "AggregatorEntry",
    "DPState",
    "Exchange",
    "ServerOptState",
    "ServerOptimizer",
    "HetLoRAState",
    "Aggregator",
    "Inputs",
    "MixState",
    "dp_aggregator",
    "expert_aggregator",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavg_aggregator",
    "fedavg_matrix",
    "fedavgm",
    "fedyogi",
    "flexlora_aggregator",
    "global_exchange",
    "hetlora_aggregator",
    "holder_average",
    "krum_aggregator",
    "krum_scores",
    "local",
    "local_aggregator",
    "logits_exchange",
    "make_aggregator",
    "median_aggregator",
    "mix",
    "model_exchange",
    "num_clients",
    "oracle_trust",
    "prediction_trust",
    "rank_exchange",
    "server_optimizer",
    "with_server_optimizer",
    "softmax_trust",
    "topology",
    "tree_bytes",
    "trimmed_mean_aggregator",
    "trust_aggregator",
    "validation_trust",
    "weight_similarity",
    "weight_similarity_scores",
]
