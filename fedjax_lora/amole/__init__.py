"""FedAMoLE's heterogeneous mixture of LoRA experts (AMoLE) and its client-side RSEA statistics.

Zhang et al., arXiv:2411.19128. The module: `module.AMoLE`, installed by `add_amole`; the server's
assignment: `fedjax_lora.aggregation.rsea`; aggregation: `fedjax_lora.aggregation.experts`; the
algorithm: `fedjax_lora.algorithms.fedamole`.
"""

from fedjax_lora.amole.module import (
    AMoLE,
    AMoLEConfig,
    ExpertMask,
    RoutingEmbeddings,
    add_amole,
    by_module,
    expert_masks,
    held_by_all,
    holders,
    module_path,
)
from fedjax_lora.amole.stats import Stats, add_noise, make_client_stats

__all__ = [
    "AMoLE",
    "AMoLEConfig",
    "ExpertMask",
    "RoutingEmbeddings",
    "Stats",
    "add_amole",
    "add_noise",
    "by_module",
    "expert_masks",
    "held_by_all",
    "holders",
    "make_client_stats",
    "module_path",
]
