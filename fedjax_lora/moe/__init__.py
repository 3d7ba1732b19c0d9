"""Mixtures of LoRA experts: the CoMiGS generalist/specialist MLP block (`comigs`)."""

from fedjax_lora.moe.comigs import (
    ExpertMask,
    GPT2MoEMLP,
    LlamaMoEMLP,
    LoRAExperts,
    MoEConfig,
    MoEMLP,
    Router,
    TokenRouter,
    install_moe,
    load_balancing_loss,
    set_expert_counts,
    top_k_gating,
)

__all__ = [
    "ExpertMask",
    "GPT2MoEMLP",
    "LlamaMoEMLP",
    "LoRAExperts",
    "MoEConfig",
    "MoEMLP",
    "Router",
    "TokenRouter",
    "install_moe",
    "load_balancing_loss",
    "set_expert_counts",
    "top_k_gating",
]
