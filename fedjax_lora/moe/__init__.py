"""Mixtures of LoRA experts: the CoMiGS generalist/specialist MLP block (`comigs`) and the analysis
of its routing (`routing`)."""

from fedjax_lora.moe.comigs import (
    ROUTING_WEIGHTS,
    Expert,
    ExpertMask,
    GPT2MoEMLP,
    LlamaMoEMLP,
    LoRAExperts,
    MoEConfig,
    MoEMLP,
    Router,
    TokenRouter,
    cv2_balancing_loss,
    install_moe,
    load_balancing_loss,
    set_expert_counts,
    top_k_gating,
)
from fedjax_lora.moe.routing import (
    Routing,
    TokenShare,
    generalist_shares,
    plot_routing_shares,
    routing_analysis,
    routing_weights,
)

__all__ = [
    "Expert",
    "ExpertMask",
    "GPT2MoEMLP",
    "LlamaMoEMLP",
    "LoRAExperts",
    "MoEConfig",
    "MoEMLP",
    "ROUTING_WEIGHTS",
    "Router",
    "Routing",
    "TokenRouter",
    "TokenShare",
    "cv2_balancing_loss",
    "generalist_shares",
    "install_moe",
    "load_balancing_loss",
    "plot_routing_shares",
    "routing_analysis",
    "routing_weights",
    "set_expert_counts",
    "top_k_gating",
]
