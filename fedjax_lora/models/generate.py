"""Greedy decoding inside one `jit`, with a key/value cache or with a full forward per step.

Prompt batches are **left-padded**: every row's prompt ends at the same buffer slot `T0 - 1`, so
each decoding step writes one slot shared by all rows (a static-shape update). Padding is excluded
by the key mask and real tokens get positions `0, 1, …` (the cumulative count of real tokens), so
a padded row decodes exactly as its unpadded prompt would.

With the cache (`CausalLM.init_cache`, `decode`) the prompt is run once (prefill, writing its
keys/values into `[B, T0 + max_new_tokens, Hkv, Dh]` buffers per layer) and every later step runs
one token; without it every step is a full forward over the `[B, T0 + max_new_tokens]` buffer
(the reference path, and the path of models holding a soft prompt). Decoding stops when every row
has produced `eos_id` (`lax.while_loop`) or after `max_new_tokens`; after its first EOS a row
keeps emitting `eos_id`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["generate", "greedy_decode"]


def greedy_decode(
    model: nnx.Module,
    prompts: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    use_cache: bool | None = None,
) -> jax.Array:
    """Greedy continuation of left-padded prompts (call inside `jit`).

    prompts: `int32 [B, T0]`; prompt_mask: `[B, T0]`, 1 on real tokens (left padding 0).
    Returns the new tokens `int32 [B, max_new_tokens]`: `y_i = argmax_v p(v | prompt, y_<i)`;
    with `eos_id`, a row is finished at its first EOS and padded with `eos_id` after it, and a
    row without any real token (a padding example) is all `eos_id`. use_cache: decode with a
    key/value cache (default: yes, unless the model holds a soft prompt, which the cached path
    does not support).
    """
    b, t0 = prompts.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    slots = t0 + max_new_tokens
    virtual = model.num_virtual_tokens()
    if virtual + slots > model.config.max_positions:
        raise ValueError(
            f"{virtual} virtual tokens + prompt length {t0} + max_new_tokens {max_new_tokens} "
            f"exceed the model's {model.config.max_positions} positions; shorten the prompts or "
            "max_new_tokens"
        )
    soft_prompt = virtual > 0
    if use_cache is None:
        use_cache = not soft_prompt
    elif use_cache and soft_prompt:
        raise ValueError("the key/value cache does not support soft prompts; use_cache=False")
    key_mask = jnp.concatenate(
        [prompt_mask.astype(bool), jnp.ones((b, max_new_tokens), bool)], axis=1
    )
    positions = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0).astype(jnp.int32)

    if use_cache:
        cache = model.init_cache(b, slots)
        logits, state = model.decode(prompts, positions[:, :t0], key_mask, cache)

        def step_logits(slot, token, cache):
            pos = jax.lax.dynamic_slice_in_dim(positions, slot, 1, axis=1)
            logits, cache = model.decode(token[:, None], pos, key_mask, cache)
            return logits[:, 0], cache

    else:
        state = jnp.zeros((b, slots), jnp.int32).at[:, :t0].set(prompts)
        logits = model(prompts, positions=positions[:, :t0], attention_mask=prompt_mask)

        def step_logits(slot, token, buffer):
            # Causal attention: the still-empty slots after `slot` do not affect its logits.
            buffer = jax.lax.dynamic_update_index_in_dim(buffer, token, slot, axis=1)
            logits = model(buffer, positions=positions, attention_mask=key_mask)
            return jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False), buffer

    def pick(logits, done):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if eos_id is None:
            return token, done
        token = jnp.where(done, eos_id, token)
        return token, done | (token == eos_id)

    token, done = pick(logits[:, -1], ~jnp.any(key_mask[:, :t0], axis=1))
    fill = 0 if eos_id is None else eos_id
    out = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(token)

    def cond(carry):
        i, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, done, token, state = carry
        logits, state = step_logits(t0 + i - 1, token, state)
        token, done = pick(logits, done)
        out = jax.lax.dynamic_update_index_in_dim(out, token, i, axis=1)
        return i + 1, out, done, token, state

    carry = (jnp.ones((), jnp.int32), out, done, token, state)
    return jax.lax.while_loop(cond, body, carry)[1]


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _greedy(graphdef, state, tokens, mask, max_new_tokens, eos_id, use_cache):
    model = nnx.merge(graphdef, state)
    new = greedy_decode(model, tokens, mask, max_new_tokens, eos_id=eos_id, use_cache=use_cache)
    return jnp.concatenate([tokens, new], axis=1)


def generate(
    model: nnx.Module,
    tokens: jax.Array,
    max_new_tokens: int,
    *,
    prompt_mask: jax.Array | None = None,
    eos_id: int | None = None,
    use_cache: bool | None = None,
) -> jax.Array:
    """Greedy continuation: `tokens int[B, T] -> int32[B, T + max_new_tokens]` (prompt, then the
    new tokens; see `greedy_decode`). `prompt_mask [B, T]` marks real tokens of left-padded
    prompts (default: all real). Compiled once per (shape, max_new_tokens, eos_id, use_cache).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        mask = None if prompt_mask is None else jnp.asarray(prompt_mask)[None]
        out = generate(
            model,
            tokens[None],
            max_new_tokens,
            prompt_mask=mask,
            eos_id=eos_id,
            use_cache=use_cache,
        )
        return out[0]
    mask = jnp.ones(tokens.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, tokens, mask, int(max_new_tokens), eos_id, use_cache)
