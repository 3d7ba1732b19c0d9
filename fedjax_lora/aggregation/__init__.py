"""Pure aggregators over stacked client trees (leaves `[N, ...]`): mixing, FedAvg, trust rules.

`core`: mixing, FedAvg, local, the optax-style `Aggregator` protocol and its factories. `trust`:
the trust matrices of Wagner, Fan & Jaggi (COLM 2024). `registry`: every aggregator by name.
`ranks`, `hetlora`, `flexlora`: heterogeneous LoRA ranks (zero-padded, masked) and the HetLoRA and
FlexLoRA servers (not mixing matrices, so outside the registry's battery).
"""

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
from fedjax_lora.aggregation.experts import expert_aggregator, holder_average
from fedjax_lora.aggregation.flexlora import flexlora_aggregator
from fedjax_lora.aggregation.hetlora import HetLoRAState, hetlora_aggregator
from fedjax_lora.aggregation.registry import AGGREGATORS, AggregatorEntry, make_aggregator
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
    "HetLoRAState",
    "Aggregator",
    "Inputs",
    "MixState",
    "expert_aggregator",
    "fedavg",
    "fedavg_aggregator",
    "fedavg_matrix",
    "flexlora_aggregator",
    "hetlora_aggregator",
    "holder_average",
    "local",
    "local_aggregator",
    "make_aggregator",
    "mix",
    "num_clients",
    "oracle_trust",
    "prediction_trust",
    "softmax_trust",
    "topology",
    "trust_aggregator",
    "validation_trust",
    "weight_similarity",
    "weight_similarity_scores",
]
