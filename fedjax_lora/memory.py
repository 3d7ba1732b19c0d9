"""Memory estimates from sizes alone, before anything is allocated (pure Python, no JAX): the
base's parameters, the clients' token data and one training step's activations, refused with
the amount needed when they exceed the host's physical memory."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["check_fits", "experiment_bytes", "host_memory_bytes", "parameter_count"]


def parameter_count(model: Any) -> int:
    """Base parameters of a model config (`ModelConfig` or the experiment's `ModelSpec`; an
    upper bound: full multi-head attention, biases ignored): embeddings `V·d` (+ positions
    `P·d` for GPT-2, + an untied head `V·d`), per layer the attention `4·d·H·Dh` and the MLP
    `2·d·ff` (GPT-2) or `3·d·ff` (Llama's SwiGLU)."""
    d = model.d_model
    head_dim = getattr(model, "head_dim", None) or d // max(model.n_heads, 1)
    embed = model.vocab_size * d * (1 if getattr(model, "tie_embeddings", True) else 2)
    if model.family == "gpt2":
        embed += model.max_positions * d
    mlp = (2 if model.family == "gpt2" else 3) * d * model.d_ff
    return embed + model.n_layers * (4 * d * model.n_heads * head_dim + mlp)


def experiment_bytes(config: Any) -> dict[str, int]:
    """Estimated bytes of an `ExperimentConfig`'s built-in base (float32), of its synthetic
    clients' token streams (int32, train + validation + test), and of one client's training
    step (activations of every layer plus the logits, float32, with their gradients)."""
    spec, data, train = config.model, config.data, config.training
    out = {"parameters": 4 * parameter_count(spec) if not spec.source else 0}
    if data.source == "synthetic":
        clients = data.num_groups * data.clients_per_group
        per_client = data.tokens_per_client * (1 + data.val_fraction + data.test_fraction)
        out["token data"] = int(4 * clients * per_client)
    if not spec.source:
        tokens = train.batch_size * train.seq_len
        per_token = spec.n_layers * (8 * spec.d_model + 2 * spec.d_ff) + spec.vocab_size
        out["activations"] = 2 * 4 * tokens * per_token
    return out


def host_memory_bytes() -> int:
    """Physical memory of this host (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_fits(what: str, needed: int, where: str) -> None:
    """Raises `ValueError` naming `where` and the amount when `needed` bytes exceed the host's
    memory."""
    have = host_memory_bytes()
    if have and needed > have:
        raise ValueError(
            f"{where}: {what} needs about {needed / 2**30:.1f} GiB, more than this host's "
            f"{have / 2**30:.1f} GiB; choose smaller sizes"
        )
