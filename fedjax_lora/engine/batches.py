"""On-device batch sampling from one client's token stream.

A client's stream is `tokens: int32 [L]` (right-padded) with a true `length`; a window is
`tokens[s : s + T + 1]`, inputs are its first T tokens and targets the last T (shifted by one).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lora.settings import Sampling


class Batch(NamedTuple):
    inputs: jax.Array  # int32 [B, T]
    targets: jax.Array  # int32 [B, T]
    weights: jax.Array  # f32 [B, T]: 1 where the target counts in the loss


def windows_at(tokens: jax.Array, starts: jax.Array, seq_len: int, mask: jax.Array | None) -> Batch:
    """Windows of `seq_len + 1` tokens starting at `starts [B]`; `mask` marks counted targets."""
    take = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(tokens, s, seq_len + 1))
    w = take(starts)
    if mask is None:
        weights = jnp.ones((starts.shape[0], seq_len), jnp.float32)
    else:
        weights = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(mask, s + 1, seq_len))(starts)
        weights = weights.astype(jnp.float32)
    return Batch(w[:, :-1], w[:, 1:], weights)


def sample_starts(
    key: jax.Array,
    length: jax.Array,
    counter: jax.Array,
    *,
    batch_size: int,
    seq_len: int,
    max_windows: int,
    sampling: Sampling,
    examples: bool = False,
) -> jax.Array:
    """Window start positions for one batch.

    `random`: uniform with replacement over `[0, length - seq_len - 1]` (nanoGPT's `get_batch`, as
    the reference codes do). `epoch`: the stream's non-overlapping windows (stride `seq_len`) in a
    fresh random order each epoch (the FedAMoLE reference's reshuffled data loader). `examples`:
    the stream is a run of slots of `seq_len + 1` tokens, one padded example each
    (`data.instruction_packing=examples`); windows are whole slots (stride `seq_len + 1`), a
    uniform slot with replacement (`random`) or the slots in epoch order. `counter` counts
    windows drawn so far, so the permutation of epoch `e = counter // n` is drawn from
    `fold_in(key, e)`. `max_windows` is the static bound on any client's window count (padded
    windows are sorted to the end of the permutation).
    """
    stride = seq_len + 1 if examples else seq_len
    n = jnp.maximum((length - seq_len - 1) // stride + 1, 1)
    if sampling == "random":
        if examples:
            return jax.random.randint(key, (batch_size,), 0, n) * stride
        return jax.random.randint(key, (batch_size,), 0, length - seq_len)
    idx = counter + jnp.arange(batch_size)
    epoch, pos = idx // n, idx % n

    def start(e, p):
        u = jax.random.uniform(jax.random.fold_in(key, e), (max_windows,))
        order = jnp.argsort(jnp.where(jnp.arange(max_windows) < n, u, 2.0))
        return order[p] * stride

    return jax.vmap(start)(epoch, pos)
