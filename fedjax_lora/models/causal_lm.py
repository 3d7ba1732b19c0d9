"""What every model family shares: the call signature, default positions and the output head."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_lora.models.config import ModelConfig
from fedjax_lora.models.layers import Embed, KVCache, Linear


class CausalLM(nnx.Module):
    """`tokens [B, T] -> logits f32 [B, T, V]`; dropout active iff `rngs` is given.

    Subclasses build their backbone and implement `embedding()` (the token table) and
    `hidden_states(tokens, positions, attention_mask, rngs)`, whose first layer is
    `input_embeddings`; the head is tied to the token embedding or a separate `lm_head`.

    A soft prompt (`fedjax_lora.prompt_tuning`, the optional `prompt` attribute) puts `P` virtual
    token embeddings before the tokens' embeddings. As in PEFT, the real tokens then sit at
    positions `P, P+1, …` (a given `positions` is shifted by `P`), the prefix is always attended
    to, and the `P` prefix outputs are dropped: logits stay `[B, T, V]`.

    Decoding with a key/value cache (`init_cache`, `decode`): `hidden_states(..., cache=caches)`
    takes one `KVCache` per layer and returns `(hidden, updated caches)`.

    `remat` (default False; the engine sets it on its merged copy under `training.remat`): every
    transformer block runs as `nnx.remat` (`jax.checkpoint`), so a backward pass stores each
    block's input only and recomputes the block's activations. `features` is the call without
    the head (the engine's chunked cross-entropy applies `head` piece by piece).
    """

    remat: bool = False

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

    def hidden_states(self, tokens, positions, attention_mask, rngs, cache=None):
        raise NotImplementedError

    def num_virtual_tokens(self) -> int:
        """`P`: the soft prompt's length (0 without one)."""
        prompt = getattr(self, "prompt", None)
        return 0 if prompt is None else prompt.num_virtual_tokens

    def input_embeddings(self, tokens: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """`[B, T, d]` token embeddings, preceded by the soft prompt's `[P, d]` when the model
        holds one: `[B, P + T, d]`."""
        x = self.embedding()(tokens)
        if self.num_virtual_tokens() == 0:
            return x
        prefix = self.prompt(rngs).astype(x.dtype)
        prefix = jnp.broadcast_to(prefix, (x.shape[0], *prefix.shape))
        return jnp.concatenate([prefix, x], axis=1)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        return self.head(
            self.features(tokens, positions=positions, attention_mask=attention_mask, rngs=rngs)
        )

    def features(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The final hidden states `[B, T, d]` that `head` maps to logits."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        p = self.num_virtual_tokens()
        if p:
            b = tokens.shape[0]
            positions = jnp.concatenate(
                [jnp.broadcast_to(jnp.arange(p), (b, p)).astype(positions.dtype), positions + p], 1
            )
            if attention_mask is not None:
                ones = jnp.ones((b, p), attention_mask.dtype)
                attention_mask = jnp.concatenate([ones, attention_mask], axis=1)
        return self.hidden_states(tokens, positions, attention_mask, rngs)[:, p:]

    def layer(self, block: nnx.Module, *args):
        """`block(*args)`, under `nnx.remat` when `self.remat` is set."""
        if not self.remat:
            return block(*args)
        return nnx.remat(lambda b, *a: b(*a), graph=False)(block, *args)

    def head(self, x: jax.Array) -> jax.Array:
        """Hidden states `[..., d]` -> logits f32 `[..., V]` (tied or separate head)."""
        if self.lm_head is None:
            return self.embedding().attend(x)
        return self.lm_head(x).astype(jnp.float32)

    def init_cache(self, batch: int, slots: int) -> tuple[KVCache, ...]:
        """Empty key/value caches of `slots` positions, one per layer, in the weights' dtype."""
        cfg = self.config
        dtype = self.embedding().weight.dtype
        return tuple(
            KVCache.zeros(batch, slots, cfg.num_kv_heads, cfg.dim_per_head, dtype)
            for _ in range(cfg.n_layers)
        )

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: tuple[KVCache, ...],
    ) -> tuple[jax.Array, tuple[KVCache, ...]]:
        """Logits of `tokens [B, t]` placed at cache slots `index … index + t - 1` (the prompt
        at prefill, one token per decoding step), and the caches with their keys/values written.

        positions: `[B, t]`; attention_mask: `[B, S]`, 1 on the cache slots holding real tokens
        (padding 0). Dropout off. Not for models holding a soft prompt (it would be prepended at
        every step): decode those with full forwards.
        """
        x, cache = self.hidden_states(tokens, positions, attention_mask, None, cache=cache)
        return self.head(x), cache
