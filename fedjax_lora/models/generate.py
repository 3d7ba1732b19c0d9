"""Greedy decoding on a fixed-size buffer: one jit, compiled once per (shape, max_new_tokens)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["generate"]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(graphdef, state, tokens, max_new_tokens):
    model = nnx.merge(graphdef, state)
    b, t0 = tokens.shape
    buffer = jnp.zeros((b, t0 + max_new_tokens), jnp.int32).at[:, :t0].set(tokens)

    def step(i, buf):
        # Causal attention: positions >= i (still padding) do not affect the logits at i - 1.
        logits = model(buf)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i - 1, axis=1, keepdims=False), -1)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32), i, axis=1)

    return jax.lax.fori_loop(t0, t0 + max_new_tokens, step, buffer)


def generate(model: nnx.Module, tokens: jax.Array, max_new_tokens: int) -> jax.Array:
    """Greedy continuation: `tokens int[B, T] -> int32[B, T + max_new_tokens]`.

    The whole loop runs inside one `jit` on a padded `[B, T + max_new_tokens]` buffer (a full
    forward per step, no KV cache), so it compiles once per prompt shape.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        return generate(model, tokens[None], max_new_tokens)[0]
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, tokens, int(max_new_tokens))
