"""What every model family shares: the call signature, default positions and the output head."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.layers import Embed, Linear


class CausalLM(nnx.Module):
    """`tokens [B, T] -> logits f32 [B, T, V]`; dropout active iff `rngs` is given.

    Subclasses build their backbone and implement `embedding()` (the token table) and
    `hidden_states(tokens, positions, attention_mask, rngs)`; the head is tied to the token
    embedding or a separate `lm_head`.
    """

    def __init__(self, cfg: ModelConfig, family: str, dtype: Any):
        if cfg.family != family:
            raise ValueError(f"{type(self).__name__} needs family={family!r}, got {cfg.family!r}")
        self.config = cfg
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype)
        )

    def embedding(self) -> Embed:
        raise NotImplementedError

    def hidden_states(self, tokens, positions, attention_mask, rngs) -> jax.Array:
        raise NotImplementedError

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        x = self.hidden_states(tokens, positions, attention_mask, rngs)
        if self.lm_head is None:
            return self.embedding().attend(x)
        return self.lm_head(x).astype(jnp.float32)
